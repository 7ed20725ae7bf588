#!/usr/bin/env bash
# Where chat-server's own (user) time goes, per request and per function:
# `perf record -e cpu-clock:u` of the server alone during a PROBE run and a
# REGISTER run at keep-alive 64 (or CLIENTS), each function's samples divided by the
# requests served, in nanoseconds per request, side by side. Rates on this
# shared machine move by 6% from run to run; these figures resolve a few
# nanoseconds of one function, which is how session 9 found what
# docs/BENCHMARKS.md lists (a token drawn byte by byte, tokio's waiter
# list). Totals still move with the machine by 10% or more: compare
# builds function by function, alternating them.
# Needs `perf` (Debian's linux-perf) and the right to sample the server
# (its owner, with kernel.perf_event_paranoid <= 2).
# Usage: bench/user-profile.sh [SERVER-BIN] [rows=30] [clients=64]
set -euo pipefail
# Resolved before the cd below, so that a path relative to the caller works.
server_bin=$(realpath -m "${1:-$(dirname "$0")/../target/release/chat-server}")
cd "$(dirname "$0")/.."
command -v perf >/dev/null || { echo "perf is not installed (apt-get install linux-perf)" >&2; exit 1; }
cargo build --release -q -p chat-server -p chat-bench
rows=${2:-30}
secs=4
hz=9999
source bench/lib.sh

start_loaded_server "$server_bin" "${3:-64}"
sample_runs "$secs" -e cpu-clock:u -F "$hz" -p "$server_pid"
for op in probe register; do
  # Each sample's period is the CPU time it stands for, in ns: right even
  # where the kernel lowered the sampling rate asked for.
  perf report -i "$work/$op.data" --sort sym -F period,sym -q --stdio 2>/dev/null >"$work/$op.syms"
done

python3 - "$work" "$secs" "$rows" "$clients" <<'PY'
import sys
work, secs, rows, clients = sys.argv[1], float(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
def per_request(op):
    rate = float(open(f"{work}/{op}.n").read())
    out = {}
    for line in open(f"{work}/{op}.syms"):
        parts = line.split(None, 2)
        if len(parts) < 3:
            continue
        # ns of CPU / requests in the window = ns per request
        name = parts[2].strip()
        out[name] = out.get(name, 0.0) + int(parts[0]) / (rate * secs)
    return rate, out
rp, p = per_request("probe")
rr, r = per_request("register")
print(f"# chat-server user time per request, keep-alive {clients}, {secs:g} s sampled")
print(f"# PROBE {rp:.0f} req/s, REGISTER {rr:.0f} req/s")
print()
print("| function | PROBE ns/req | REGISTER ns/req |")
print("|---|---:|---:|")
for name in sorted(set(p) | set(r), key=lambda k: -max(p.get(k, 0), r.get(k, 0)))[:rows]:
    print(f"| `{name[:90]}` | {p.get(name, 0):.1f} | {r.get(name, 0):.1f} |")
print(f"| all | {sum(p.values()):.0f} | {sum(r.values()):.0f} |")
PY
