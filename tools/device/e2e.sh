#!/usr/bin/env bash
# One device-tool call for the end-to-end figures (issue 9) and the SLA sweep, after tools/device/prep.sh:
#   run(command="bash tools/device/e2e.sh", carry=[".carry/whl", ".carry/whl_e2e"])
# Writes benchmarks/{e2e,attention}.json, the chart and the logs under $OUT (merge them into the committed
# files by hand: a partial run must not drop figures it did not measure). EXTRA: more bench_e2e flags.
source tools/device/env.sh
set -o pipefail
timeout 420 python3 tools/bench_e2e.py --ttfv-runs 2 --with-14b --budget-s 400 ${EXTRA} 2>&1 | tee "$OUT/e2e.log" \
  | grep -v -E "it/s]|s/it]|__recompiles"
cp benchmarks/e2e.json benchmarks/e2e_breakdown.png "$OUT/" 2>/dev/null
timeout 150 python3 tools/bench_attention.py --sweep --shapes 1.3b,14b_720p --topks 0.1 2>&1 | tee "$OUT/attention.log" | tail -40
cp benchmarks/attention.json "$OUT/" 2>/dev/null
