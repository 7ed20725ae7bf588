#!/usr/bin/env bash
# How reading a long history affects the peer link: alice holds a history
# of one million messages and chats with bob; bob's `chatctl send` (stored
# and acknowledged by alice) is timed with alice idle, then while shells on
# alice run `history --grep` one after another, then `tail -n 100000`.
# Release builds, a temporary directory, loopback only. Needs python3 (to
# write the history and time the sends). Usage: bench/search.sh
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -q -p chat-server -p chatd -p chatctl
bin=$PWD/target/release
w=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$w"
}
trap cleanup EXIT
export XDG_RUNTIME_DIR=$w/run XDG_DATA_HOME=$w/data XDG_CONFIG_HOME=$w/config
mkdir -p "$XDG_RUNTIME_DIR" "$w/alice" && chmod 700 "$XDG_RUNTIME_DIR" "$w/alice"

# The schema chatd creates (chatd/src/history.rs), filled before it starts.
python3 - "$w/alice/history.db" <<'PY'
import sqlite3, sys
c = sqlite3.connect(sys.argv[1])
c.executescript("""PRAGMA journal_mode=WAL;
CREATE TABLE IF NOT EXISTS records (seq INTEGER PRIMARY KEY, time_ms INTEGER NOT NULL,
  kind TEXT NOT NULL, peer TEXT, outgoing INTEGER, state TEXT, text TEXT, delivered INTEGER);""")
c.executemany("INSERT INTO records (time_ms, kind, peer, outgoing, text, delivered) VALUES (?,?,?,?,?,?)",
              ((i, 'message', 'bob', 1, 'message number %d with some words in it' % i, 1)
               for i in range(1_000_000)))
c.commit()
PY

"$bin/chat-server" --bind 127.0.0.1 --port 0 >"$w/server.out" 2>"$w/server.err" &
pids+=($!)
for _ in $(seq 100); do grep -q listening "$w/server.out" 2>/dev/null && break; sleep 0.05; done
server=$(awk '{print $3; exit}' "$w/server.out")
[ -n "$server" ] || { echo "chat-server did not start:" >&2; cat "$w/server.err" >&2; exit 1; }
RUST_LOG=warn "$bin/chatd" --id alice --port 0 --server "$server" --data-dir "$w/alice" 2>"$w/alice.err" &
pids+=($!)
RUST_LOG=warn "$bin/chatd" --id bob --port 0 --server "$server" --data-dir "$w/bob" 2>"$w/bob.err" &
pids+=($!)
a() { "$bin/chatctl" --socket "$XDG_RUNTIME_DIR/chatd/alice.sock" "$@"; }
b() { "$bin/chatctl" --socket "$XDG_RUNTIME_DIR/chatd/bob.sock" "$@"; }
for _ in $(seq 200); do a status >/dev/null 2>&1 && b status >/dev/null 2>&1 && break; sleep 0.05; done
a register >/dev/null; b register >/dev/null
b bridge >/dev/null; a bridge >/dev/null; a chat >/dev/null
b wait chatting --timeout 10 >/dev/null

timed() { # label: 40 sends from bob, p50/p90/max
  python3 - "$1" "$bin/chatctl" "$XDG_RUNTIME_DIR/chatd/bob.sock" <<'PY'
import subprocess, sys, time, statistics
label, ctl, sock = sys.argv[1:]
ts = []
for _ in range(40):
    t = time.perf_counter()
    subprocess.run([ctl, "--socket", sock, "send", "hi"], stdout=subprocess.DEVNULL, check=True)
    ts.append((time.perf_counter() - t) * 1000)
    time.sleep(0.02)
ts.sort()
print("| %s | %.1f ms | %.1f ms | %.1f ms |" % (label, statistics.median(ts), ts[int(len(ts) * 0.9)], ts[-1]))
PY
}
echo "# bob's chatctl send to alice (1M messages in her history), $(nproc) cores, $(date -u +%F)"
echo
echo "| alice is | p50 | p90 | max |"
echo "|---|---:|---:|---:|"
timed "idle"
( while :; do a history --grep zzz-not-there >/dev/null 2>&1; done ) &
grep_loop=$!
pids+=($grep_loop)
sleep 0.3
timed "running history --grep, one after another"
kill "$grep_loop" 2>/dev/null || true
wait "$grep_loop" 2>/dev/null || true
( while :; do a tail -n 100000 >/dev/null 2>&1; done ) &
pids+=($!)
sleep 0.3
timed "running tail -n 100000, one after another"
