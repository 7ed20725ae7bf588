# Shared by the benchmark scripts (sourced, not run): a work folder
# removed on exit with every process started, the XDG directories inside
# it; starting nginx and chat-servers with their limits off (compare.sh,
# ab.sh, poll-cost.sh, cpu-split.sh, user-profile.sh), and a chat-server
# with its defaults, chatd daemons and a chat between two (peer.sh,
# search.sh).
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

# The requests/s of `chat-bench run` output (on stdin, or in FILE).
rate_of() { # [file]
  sed 's/.*: \([0-9]*\) requests.*/\1/' "$@"
}

# Starts chat-server BIN on a free loopback port with ARGS, its output in
# $work/NAME.out and .err, and waits until it listens; sets $server_addr
# and $server_pid. Not for a subshell: the pid must reach the cleanup.
launch_server() { # name bin args...
  local name=$1 bin_=$2
  shift 2
  "$bin_" --bind 127.0.0.1 --port 0 "$@" >"$work/$name.out" 2>"$work/$name.err" &
  server_pid=$!
  pids+=($server_pid)
  for _ in $(seq 100); do grep -q listening "$work/$name.out" 2>/dev/null && break; sleep 0.05; done
  server_addr=$(awk '{print $3; exit}' "$work/$name.out")
  [ -n "$server_addr" ] || failed chat-server "$work/$name.err"
}

# Starts chat-server with its defaults; sets $server.
start_server() {
  launch_server server "$bin/chat-server"
  server=$server_addr
}

# Starts chat-server BIN as launch_server does, with the per-address and
# global limits off.
start_open_server() { # name bin args...
  local name=$1 bin_=$2
  shift 2
  launch_server "$name" "$bin_" --per-ip-rate 0 --per-ip-conns 0 --max-conns 0 \
    --max-registrations 0 "$@"
}

# Starts a chat-server build as bench/compare.sh runs it (limits off,
# registrations lapsing after 10 s), fills its registry to its steady size
# with keep-alive REGISTERs, and defines `run OP SECONDS` (keep-alive,
# CLIENTS clients, 64 unless given, against it). Sets $addr, $clients and
# $server_pid. Not for a subshell: the pid must reach the cleanup.
start_loaded_server() { # bin [clients]
  start_open_server s "$1" --expires 10
  addr=$server_addr
  clients=${2:-64}
  run() { # op seconds
    "$bin/chat-bench" run --target "$addr" --op "$1" --mode keepalive -c "$clients" --duration "$2" --sources 254
  }
  run register 3 >/dev/null
}

# Installs Debian's nginx-light if missing and starts it on a free
# loopback port with a config of its own: two workers (one per core),
# `reuseport`, no access log, a fixed 150-byte body. Sets $nginx_bin,
# $nginx_port and $nginx_pid (its master).
start_nginx() {
  if ! command -v nginx >/dev/null 2>&1 && [ ! -x /usr/sbin/nginx ]; then
    echo "installing nginx-light..." >&2
    local sudo=""
    [ "$(id -u)" -ne 0 ] && sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq nginx-light >/dev/null
  fi
  nginx_bin=$(command -v nginx || echo /usr/sbin/nginx)
  nginx_port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  local body
  body=$(head -c 150 /dev/zero | tr '\0' 'x')
  mkdir -p "$work/logs"
  cat >"$work/nginx.conf" <<CONF
worker_processes auto;
worker_rlimit_nofile 65536;
pid $work/nginx.pid;
error_log $work/logs/error.log warn;
daemon off;
events { worker_connections 16384; }
http {
  access_log off;
  keepalive_requests 10000000;
  keepalive_timeout 65;
  client_body_temp_path $work/body;
  proxy_temp_path $work/proxy;
  server {
    listen 127.0.0.1:$nginx_port reuseport;
    location / { default_type text/plain; return 200 "$body"; }
  }
}
CONF
  "$nginx_bin" -p "$work" -c "$work/nginx.conf" &
  nginx_pid=$!
  pids+=($nginx_pid)
  for _ in $(seq 100); do
    (exec 3<>"/dev/tcp/127.0.0.1/$nginx_port") 2>/dev/null && return
    sleep 0.05
  done
  failed nginx "$work/logs/error.log"
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
    rate_of "$work/$op.rate" >"$work/$op.n"
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
