#!/usr/bin/env bash
# Reruns the peer-link and CLI benchmark of docs/BENCHMARKS.md: a local
# chat-server and two chatd on loopback (release builds, temporary
# directories), chatting; then chat-bench measures the 64-byte round trip
# against a bare TCP ping-pong, messages/s on one link, `chatctl send`
# against `chatctl --version`, and an idle daemon's memory.
# Usage: bench/peer.sh [rounds]
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-3}

cargo build --release -q -p chat-server -p chatd -p chatctl -p chat-bench
bin=target/release
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

# Says why a process did not start (its log goes with the work folder).
failed() { # what log
  echo "$1 did not start; its log:" >&2
  cat "$2" >&2 || true
  exit 1
}

"$bin/chat-server" --bind 127.0.0.1 --port 0 >"$work/server.out" 2>"$work/server.err" &
pids+=($!)
for _ in $(seq 100); do grep -q listening "$work/server.out" 2>/dev/null && break; sleep 0.05; done
server=$(awk '{print $3; exit}' "$work/server.out")
[ -n "$server" ] || failed chat-server "$work/server.err"

start() { # id
  RUST_LOG=warn "$bin/chatd" --id "$1" --port 0 --server "$server" 2>"$work/$1.err" &
  pids+=($!)
  for _ in $(seq 200); do "$bin/chatctl" --socket "$XDG_RUNTIME_DIR/chatd/$1.sock" status >/dev/null 2>&1 && return; sleep 0.05; done
  failed "chatd $1" "$work/$1.err"
}
start alice; start bob; start idle
idle_pid=${pids[-1]}
a() { "$bin/chatctl" --socket "$XDG_RUNTIME_DIR/chatd/alice.sock" "$@"; }
b() { "$bin/chatctl" --socket "$XDG_RUNTIME_DIR/chatd/bob.sock" "$@"; }
"$bin/chatctl" --socket "$XDG_RUNTIME_DIR/chatd/idle.sock" register >/dev/null
a register >/dev/null; b register >/dev/null
b bridge >/dev/null; a bridge >/dev/null; a chat >/dev/null
b wait chatting --timeout 10 >/dev/null

echo "# chatd peer link and chatctl, $(nproc) cores, $(date -u +%F), $rounds rounds, medians"
echo
"$bin/chat-bench" peer --socket "$XDG_RUNTIME_DIR/chatd/alice.sock" --chatctl "$bin/chatctl" \
  --idle-pid "$idle_pid" --rounds "$rounds"
