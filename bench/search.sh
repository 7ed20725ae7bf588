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
source bench/lib.sh
mkdir -p "$work/alice" && chmod 700 "$work/alice"

# The schema chatd creates (chatd/src/history.rs), filled before it starts.
python3 - "$work/alice/history.db" <<'PY'
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

start_server
start_chatd alice --data-dir "$work/alice"
start_chatd bob --data-dir "$work/bob"
a() { ctl alice "$@"; }
pair_alice_and_bob

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
# The loop, then the grep it may be running, or that grep would be timed
# with the tails.
kill "$grep_loop" 2>/dev/null || true
pkill -f "history --grep zzz-not-there" 2>/dev/null || true
wait "$grep_loop" 2>/dev/null || true
( while :; do a tail -n 100000 >/dev/null 2>&1; done ) &
pids+=($!)
sleep 0.3
timed "running tail -n 100000, one after another"
