#!/usr/bin/env bash
# Where a request's CPU goes, machine-wide: `perf record -a` (every process,
# kernel included) during a PROBE run and a REGISTER run at keep-alive 64
# (or CLIENTS), then the samples of each (thread kind, user or kernel) divided by the
# requests served, in microseconds per request, side by side. This is how
# docs/BENCHMARKS.md placed REGISTER's extra cost in the server's own user
# and kernel time rather than the load generator's. Needs `perf` (Debian's
# linux-perf) and the right to sample the whole machine (root, or
# kernel.perf_event_paranoid <= -1).
# Usage: bench/cpu-split.sh [whole seconds=3] [clients=64]
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-3}
hz=1999
command -v perf >/dev/null || { echo "perf is not installed (apt-get install linux-perf)" >&2; exit 1; }
cargo build --release -q -p chat-server -p chat-bench
source bench/lib.sh

start_loaded_server "$bin/chat-server" "${2:-64}"
sample_runs "$secs" -a -F "$hz"
for op in probe register; do
  perf report -i "$work/$op.data" --sort comm,dso -n -q --stdio 2>/dev/null >"$work/$op.split"
done

python3 - "$work" "$secs" "$hz" "$clients" <<'PY'
import re, sys
work, secs, hz, clients = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
def split(op):
    rate = float(open(f"{work}/{op}.n").read())
    out = {}
    for line in open(f"{work}/{op}.split"):
        parts = line.split()
        if len(parts) < 4:
            continue
        n, comm, dso = int(parts[1]), parts[2], parts[3]
        who = "server" if comm.startswith("worker-") else "load generator" if comm.startswith("tokio-rt") else "other"
        part = "kernel" if dso.startswith("[kernel") else "user"
        key = (who, part)
        # samples / (requests in the window) / sample rate = seconds of CPU per request
        out[key] = out.get(key, 0.0) + n / (rate * secs) / hz * 1e6
    return rate, out
rp, p = split("probe")
rr, r = split("register")
print(f"# CPU per request, keep-alive {clients}, {secs:g} s sampled at {hz:g} Hz on every core")
print(f"# PROBE {rp:.0f} req/s, REGISTER {rr:.0f} req/s")
print()
print("| who | time | PROBE µs/req | REGISTER µs/req | difference |")
print("|---|---|---:|---:|---:|")
for key in sorted(set(p) | set(r)):
    a, b = p.get(key, 0.0), r.get(key, 0.0)
    print(f"| {key[0]} | {key[1]} | {a:.2f} | {b:.2f} | {b - a:+.2f} |")
ta, tb = sum(p.values()), sum(r.values())
print(f"| all | | {ta:.2f} | {tb:.2f} | {tb - ta:+.2f} |")
PY
