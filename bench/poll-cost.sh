#!/usr/bin/env bash
# What busy polling buys and costs at one client (docs/BENCHMARKS.md,
# "Session 10"): requests/s and the server's CPU time per request, read
# from /proc/PID/stat (nginx's: its master and workers), for nginx (GET),
# chat-server --busy-poll 0 and chat-server as it runs by default
# (REGISTER of fresh ids), side by side, transient and keep-alive, the
# three in that order in every round. Not rotated: session 9 found a
# one-client run that follows another reads slower, which if anything
# counts against the polling column, the last.
# Usage: bench/poll-cost.sh [rounds=2] [seconds=4]
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-2}
secs=${2:-4}
cargo build --release -q -p chat-server -p chat-bench
source bench/lib.sh
start_nginx
start_open_server sleeping "$bin/chat-server" --busy-poll 0
sleeping=("$server_addr" "$server_pid")
start_open_server polling "$bin/chat-server"
polling=("$server_addr" "$server_pid")

# CPU time of the processes given, in clock ticks (utime + stime).
ticks() {
  local t=0 p
  for p in "$@"; do t=$((t + $(awk '{print $14 + $15}' "/proc/$p/stat"))); done
  echo "$t"
}
hz=$(getconf CLK_TCK)

# One run: "req/s µs-of-server-CPU-per-request cores".
measure() { # target op mode pids...
  local target=$1 op=$2 mode=$3 before after rate
  shift 3
  before=$(ticks "$@")
  rate=$("$bin/chat-bench" run --target "$target" --op "$op" --mode "$mode" -c 1 \
    --duration "$secs" --sources 254 | rate_of)
  after=$(ticks "$@")
  python3 -c "import sys; r, t, hz, s = map(float, sys.argv[1:]); \
print(f'{r:.0f} {t / hz / (r * s) * 1e6:.1f} {t / hz / s:.2f}')" \
    "$rate" "$((after - before))" "$hz" "$secs"
}

echo "# busy polling at one client, $(nproc) cores, $(date -u +%F): $rounds rounds of ${secs}s"
echo "# server CPU per request from /proc/PID/stat; REGISTER of fresh ids to chat-server, GET to nginx"
echo
echo "| round | connections | nginx req/s · CPU µs/req · cores | --busy-poll 0 | polling (default) |"
echo "|---|---|---|---|---|"
for round in $(seq "$rounds"); do
  for mode in transient keepalive; do
    # nginx's workers are its master's children.
    n=$(measure "127.0.0.1:$nginx_port" get "$mode" "$nginx_pid" $(pgrep -P "$nginx_pid"))
    s=$(measure "${sleeping[0]}" register "$mode" "${sleeping[1]}")
    p=$(measure "${polling[0]}" register "$mode" "${polling[1]}")
    echo "| $round | $mode | ${n// / · } | ${s// / · } | ${p// / · } |"
  done
done
