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
source bench/lib.sh
start_server
start_chatd alice; start_chatd bob; start_chatd idle
idle_pid=${pids[-1]}
ctl idle register >/dev/null
pair_alice_and_bob

echo "# chatd peer link and chatctl, $(nproc) cores, $(date -u +%F), $rounds rounds, medians"
echo
"$bin/chat-bench" peer --socket "$XDG_RUNTIME_DIR/chatd/alice.sock" --chatctl "$bin/chatctl" \
  --idle-pid "$idle_pid" --rounds "$rounds"
