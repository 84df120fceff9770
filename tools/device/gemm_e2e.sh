#!/usr/bin/env bash
# One device-tool call (sessions 27, 28): the W8A8 GEMM sweep (descriptor / persistent / warp-specialized variants,
# quantization variants, q/k/v as one GEMM) and the gated-residual epilogue microbenchmark, then the end-to-end
# figures with sagesla as the bundle's attention (sla timed beside it, eager; EXTRA=--skip-gemm-compare skips the
# GEMM-config variants):
#   run(command="bash tools/device/gemm_e2e.sh", carry=[".carry/whl", ".carry/whl_e2e"])
# Logs and JSONs under $OUT (merge into the committed files by hand).
source tools/device/env.sh
set -o pipefail
mkdir -p "$OUT/b"
timeout "${GEMM_LIMIT:-200}" python3 tools/bench_lowbit.py --only "${LOWBIT_ONLY:-w8a8,residual}" > "$OUT/w8a8.log" 2>&1; echo "w8a8 rc $?"
grep -E "triton_|bf16_nn|scaled_mm|int_mm|act_quant_(fp8|int8) |w8a8_.*speedup|residual|best" "$OUT/w8a8.log" | tail -50
cp benchmarks/lowbit.json "$OUT/b/lowbit_w8a8.json" 2>/dev/null
timeout "${E2E_LIMIT:-380}" python3 tools/bench_e2e.py --skip-ttfv --skip-channels-last --budget-s "${E2E_BUDGET:-330}" \
  --attention "${ATTN:-sagesla}" ${EXTRA} 2>&1 | tee "$OUT/e2e.log" | grep -v -E "it/s]|s/it]|__recompiles" | tail -45
cp benchmarks/e2e.json benchmarks/e2e_breakdown.png "$OUT/b/" 2>/dev/null
true
