#!/usr/bin/env bash
# Compares two chat-server builds on what a REGISTER costs, the way this
# shared machine can resolve it. Two servers up at once, compared rate for
# rate, disagreed by 7% with the same binary on both sides. So each round
# measures, on each server, REGISTER of fresh ids and PROBE back to back
# (in an order rotated round by round), and takes REGISTER/PROBE: the
# PROBE is the control, which moves with the machine. The two servers'
# ratios are then compared, round by round; the median of those, with
# its quartiles, is the answer. Run it with one binary on both sides
# first: that spread is what a difference must beat.
# Usage: bench/ab.sh A-BIN B-BIN [rounds=40] [seconds=1.5] [mode=keepalive] [clients=64]
set -euo pipefail
cd "$(dirname "$0")/.."
a_bin=$(realpath "$1")
b_bin=$(realpath "$2")
rounds=${3:-40}
secs=${4:-1.5}
mode=${5:-keepalive}
clients=${6:-64}

cargo build --release -q -p chat-bench
source bench/lib.sh

# The server settings of bench/compare.sh: limits off, registrations
# lapsing after 10 s.
start_open_server A "$a_bin" --expires 10
a=$server_addr
start_open_server B "$b_bin" --expires 10
b=$server_addr

rate() { # addr op
  "$bin/chat-bench" run --target "$1" --op "$2" --mode "$mode" -c "$clients" \
    --duration "$secs" --sources 254 | rate_of
}
# Both registries filled to their steady size first.
for s in "$a" "$b"; do rate "$s" register >/dev/null; rate "$s" register >/dev/null; done

echo "# chat-server A/B, REGISTER/PROBE within each server, $mode c=$clients, $rounds rounds of ${secs}s, $(date -u +%F)"
echo "# A: $a_bin"
echo "# B: $b_bin"
# Each server's PROBE and REGISTER run back to back; which server goes
# first, and which of its two, change round by round.
orders=("$a probe,$a register,$b probe,$b register"
  "$b register,$b probe,$a register,$a probe"
  "$b probe,$b register,$a probe,$a register"
  "$a register,$a probe,$b register,$b probe")
: >"$work/rounds"
for r in $(seq "$rounds"); do
  declare -A got=()
  IFS=, read -r -a runs <<<"${orders[$((r % 4))]}"
  for run in "${runs[@]}"; do
    read -r target op <<<"$run"
    got[$run]=$(rate "$target" "$op")
  done
  echo "${got[$a probe]} ${got[$a register]} ${got[$b probe]} ${got[$b register]}" | tee -a "$work/rounds"
  unset got
done
python3 - "$work/rounds" <<'PY'
import statistics, sys
rows = [list(map(float, l.split())) for l in open(sys.argv[1]) if l.strip()]
if not rows:
    sys.exit("no rounds were run")
ra = [r[1] / r[0] for r in rows]
rb = [r[3] / r[2] for r in rows]
ab = [y / x for x, y in zip(ra, rb)]
def q(v):
    if len(v) < 2:
        return "%.3f" % v[0]
    lo, mid, hi = statistics.quantiles(v, n=4)
    return "%.3f (%.3f-%.3f)" % (statistics.median(v), lo, hi)
print()
print("REGISTER/PROBE  A: %s  B: %s" % (q(ra), q(rb)))
print("B/A, round by round: %s; B ahead in %d of %d rounds" % (q(ab), sum(x > 1 for x in ab), len(ab)))
PY
