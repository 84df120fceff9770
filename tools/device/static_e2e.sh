#!/usr/bin/env bash
# One device-tool call (session 32): the end-to-end run whose headline bundle carries static activation scales (the
# calibration default since session 32; bench_e2e --activations static exports it through a stand-in plan), with the
# text encoder, VAE, full pipeline and time to first video, and the dynamic-scale DiT timed interleaved (--ab @dynamic):
#   run(command="bash tools/device/static_e2e.sh", carry=[".carry/whl", ".carry/whl_e2e"])
source tools/device/env.sh
set -o pipefail
mkdir -p "$OUT/b"
timeout "${E2E_LIMIT:-560}" python3 tools/bench_e2e.py --attention sagesla --budget-s "${E2E_BUDGET:-420}" \
  --ttfv-runs 2 --skip-gemm-compare --skip-attention-compare --skip-residual-compare --skip-channels-last \
  --skip-compile --ab dyn=@dynamic --ab-rounds "${ROUNDS:-4}" ${EXTRA} \
  2>&1 | tee "$OUT/e2e.log" | grep -v -E "it/s]|s/it]|__recompiles" \
  | grep -E "eager|speedup|breakdown|A/B|CUDA graph|scales|first video|full pipeline|text|VAE|export|from_bundle|Error" \
  | tail -45
cp benchmarks/e2e.json "$OUT/b/" 2>/dev/null
cp benchmarks/e2e_breakdown.png "$OUT/b/" 2>/dev/null
true
