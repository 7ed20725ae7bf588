# Shared by the benchmark scripts that run chat-server and chatd (sourced,
# not run): a work folder removed on exit with every process started, the
# XDG directories inside it, and starting and pairing daemons.
# After sourcing: $bin (release builds), $work, $pids, and the functions
# below. The caller builds what it needs first.

bin=$PWD/target/release
work=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
export XDG_RUNTIME_DIR="$work/run" XDG_DATA_HOME="$work/data" XDG_CONFIG_HOME="$work/config"
mkdir -p "$XDG_RUNTIME_DIR" && chmod 700 "$XDG_RUNTIME_DIR"

# Says why a process did not start, with its log, and stops.
failed() { # what log
  echo "$1 did not start; its log:" >&2
  cat "$2" >&2 || true
  exit 1
}

# Starts chat-server on a free loopback port; sets $server.
start_server() {
  "$bin/chat-server" --bind 127.0.0.1 --port 0 >"$work/server.out" 2>"$work/server.err" &
  pids+=($!)
  for _ in $(seq 100); do grep -q listening "$work/server.out" 2>/dev/null && break; sleep 0.05; done
  server=$(awk '{print $3; exit}' "$work/server.out")
  [ -n "$server" ] || failed chat-server "$work/server.err"
}

# Starts a chat-server build as bench/compare.sh runs it (limits off,
# registrations lapsing after 10 s), fills its registry to its steady size
# with keep-alive REGISTERs, and defines `run OP SECONDS` (keep-alive, 64
# clients, against it). Sets $addr and $server_pid. Not for a subshell:
# the pid must reach the cleanup.
start_loaded_server() { # bin
  "$1" --bind 127.0.0.1 --port 0 --per-ip-rate 0 --per-ip-conns 0 --max-conns 0 \
    --max-registrations 0 --expires 10 >"$work/s.out" 2>"$work/s.err" &
  server_pid=$!
  pids+=($server_pid)
  for _ in $(seq 100); do grep -q listening "$work/s.out" 2>/dev/null && break; sleep 0.05; done
  addr=$(awk '{print $3; exit}' "$work/s.out")
  [ -n "$addr" ] || failed chat-server "$work/s.err"
  run() { # op seconds
    "$bin/chat-bench" run --target "$addr" --op "$1" --mode keepalive -c 64 --duration "$2" --sources 254
  }
  run register 3 >/dev/null
}

# Runs PROBE, then REGISTER, each SECONDS + 3 s against the server of
# start_loaded_server, and samples the middle of each run, away from its
# start and end, with `perf record PERF-ARGS -o $work/OP.data -- sleep
# SECONDS` (whole seconds). Leaves each run's requests per second in
# $work/OP.n; stops with perf's own message if it cannot sample.
sample_runs() { # seconds perf-args...
  local secs=$1 op load
  shift
  for op in probe register; do
    run "$op" $((secs + 3)) >"$work/$op.rate" &
    load=$!
    sleep 1.5
    if ! perf record -q "$@" -o "$work/$op.data" -- sleep "$secs" 2>"$work/perf.err"; then
      echo "perf record failed:" >&2
      cat "$work/perf.err" >&2
      exit 1
    fi
    wait "$load"
    sed 's/.*: \([0-9]*\) requests.*/\1/' "$work/$op.rate" >"$work/$op.n"
  done
}

# chatctl on daemon ID.
ctl() { # id args...
  local id=$1; shift
  "$bin/chatctl" --socket "$XDG_RUNTIME_DIR/chatd/$id.sock" "$@"
}

# Starts chatd ID against $server and waits until it answers.
start_chatd() { # id [chatd args...]
  local id=$1; shift
  RUST_LOG=warn "$bin/chatd" --id "$id" --port 0 --server "$server" "$@" 2>"$work/$id.err" &
  pids+=($!)
  for _ in $(seq 200); do ctl "$id" status >/dev/null 2>&1 && return; sleep 0.05; done
  failed "chatd $id" "$work/$id.err"
}

# Registers alice and bob, bridges them and has alice call bob.
pair_alice_and_bob() {
  ctl alice register >/dev/null; ctl bob register >/dev/null
  ctl bob bridge >/dev/null; ctl alice bridge >/dev/null; ctl alice chat >/dev/null
  ctl bob wait chatting --timeout 10 >/dev/null
}
