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

if ! command -v nginx >/dev/null 2>&1 && [ ! -x /usr/sbin/nginx ]; then
  echo "installing nginx-light..." >&2
  sudo=""; [ "$(id -u)" -ne 0 ] && sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq nginx-light >/dev/null
fi
nginx_bin=$(command -v nginx || echo /usr/sbin/nginx)

cargo build --release -q -p chat-server -p chat-bench
bench=target/release/chat-bench
server=target/release/chat-server

work=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  [ -f "$work/nginx.pid" ] && kill "$(cat "$work/nginx.pid" 2>/dev/null)" 2>/dev/null || true
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
nginx_port=$(free_port)
body=$(head -c 150 /dev/zero | tr '\0' 'x')
mkdir -p "$work/logs"
cat > "$work/nginx.conf" <<CONF
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
pids+=($!)

# Starts chat-server with the limits off and the given expiry; sets
# server_pid and server_addr.
start_server() { # expires name
  "$server" --bind 127.0.0.1 --port 0 --per-ip-rate 0 --per-ip-conns 0 --max-conns 0 \
    --max-registrations 0 --expires "$1" >"$work/$2.out" 2>"$work/$2.err" &
  server_pid=$!
  pids+=($server_pid)
  for _ in $(seq 100); do
    grep -q listening "$work/$2.out" 2>/dev/null && break
    sleep 0.05
  done
  server_addr=$(awk '{print $3; exit}' "$work/$2.out")
  if [ -z "$server_addr" ]; then
    echo "chat-server did not start; its log:" >&2
    cat "$work/$2.err" >&2 || true
    exit 1
  fi
}

# Registrations expire after 10 s, as on a busy server whose clients come
# and go: the registry holds a steady ~1M live entries instead of growing
# by tens of millions over the run.
start_server 10 server
nginx_up=""
for _ in $(seq 100); do
  (exec 3<>"/dev/tcp/127.0.0.1/$nginx_port") 2>/dev/null && nginx_up=1 && break
  sleep 0.05
done
if [ -z "$nginx_up" ]; then
  echo "nginx did not start; its log:" >&2
  cat "$work/logs/error.log" >&2 || true
  exit 1
fi

echo "# chat-server vs nginx-light $("$nginx_bin" -v 2>&1 | sed 's/.*nginx\///'), $(nproc) cores, $(date -u +%F)"
echo "# $rounds rounds of ${secs}s per cell; req/s are medians, \"vs nginx\" the median of per-round ratios and their quartiles; clients spread over 127.0.0.1-254"
echo
"$bench" compare --server "$server_addr" --reference "127.0.0.1:$nginx_port" \
  --rounds "$rounds" --duration "$secs" --sources 254
echo
# Memory: a fresh server, one million fresh ids over keep-alive.
kill "$server_pid"; wait "$server_pid" 2>/dev/null || true
start_server 86400 server2
"$bench" fill --target "$server_addr" --count 1000000 --pid "$server_pid"
