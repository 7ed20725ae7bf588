#!/usr/bin/env bash
# Reruns the whole server comparison of docs/BENCHMARKS.md in one sitting:
# nginx (Debian's nginx-light) serving a fixed 150-byte response against
# chat-server, transient and keep-alive, at concurrency 1, 16 and 64, rounds
# interleaved; then chat-server's memory per registration after one million
# registrations. Usage: bench/compare.sh [rounds=7] [seconds-per-run=2]
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-7}
secs=${2:-2}

cargo build --release -q -p chat-server -p chat-bench
source bench/lib.sh
bench=$bin/chat-bench
start_nginx
# Registrations expire after 10 s, as on a busy server whose clients come
# and go: the registry holds a steady ~1M live entries instead of growing
# by tens of millions over the run.
start_open_server server "$bin/chat-server" --expires 10

echo "# chat-server vs nginx-light $("$nginx_bin" -v 2>&1 | sed 's/.*nginx\///'), $(nproc) cores, $(date -u +%F)"
echo "# $rounds rounds of ${secs}s per cell; req/s are medians, \"vs nginx\" the median of per-round ratios and their quartiles; clients spread over 127.0.0.1-254"
echo
"$bench" compare --server "$server_addr" --reference "127.0.0.1:$nginx_port" \
  --rounds "$rounds" --duration "$secs" --sources 254
echo
# Memory: a fresh server, one million fresh ids over keep-alive.
kill "$server_pid"; wait "$server_pid" 2>/dev/null || true
start_open_server server2 "$bin/chat-server" --expires 86400
"$bench" fill --target "$server_addr" --count 1000000 --pid "$server_pid"
