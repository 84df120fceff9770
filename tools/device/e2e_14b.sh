#!/usr/bin/env bash
# One device-tool call (session 32): the 14B 720p turbo DiT alone (built in memory, fused as a loaded bundle, static
# activation scales as the 1.3B headline bundle carries them, then per-token ones), merged into benchmarks/e2e.json:
#   run(command="bash tools/device/e2e_14b.sh", carry=[".carry/whl", ".carry/whl_e2e"])
source tools/device/env.sh
set -o pipefail
timeout "${E2E_LIMIT:-540}" python3 tools/bench_e2e.py --skip-baseline --skip-text --skip-vae --skip-turbo --with-14b \
  --merge --attention sagesla --reps-14b "${REPS:-2}" --budget-s 500 \
  2>&1 | tee "$OUT/e2e_14b.log" | grep -v -E "it/s]|s/it]" | tail -20
cp benchmarks/e2e.json "$OUT/e2e.json" 2>/dev/null
true
