#!/usr/bin/env bash
# One device-tool call: the SLA sparse forward's and linear state kernel's variants (bench_attention --sweep
# --sweep-fwd-only; session 29 also timed a pipelined key loop there, since removed) and the 1.3B topk-0.1 figures
# with the fastest, then the gated-residual epilogue microbenchmark and the end-to-end run (sagesla bundle, eager
# and compiled, with its baseline):
#   run(command="bash tools/device/attention_e2e.sh", carry=[".carry/whl", ".carry/whl_e2e"])
# SKIP_E2E=1: the attention part alone. Logs and JSONs under $OUT (merge into the committed files by hand).
source tools/device/env.sh
set -o pipefail
mkdir -p "$OUT/b"
timeout "${ATT_LIMIT:-150}" python3 tools/bench_attention.py --sweep --sweep-fwd-only --shapes 1.3b --topks 0.1 \
  > "$OUT/attention.log" 2>&1; echo "attention rc $?"
grep -E "fwd |state|tuned|topk 0.1:|failed" "$OUT/attention.log" | tail -40
cp benchmarks/attention.json "$OUT/b/attention.json" 2>/dev/null
if [ "${SKIP_E2E:-0}" != 1 ]; then
  LOWBIT_ONLY=residual GEMM_LIMIT=${GEMM_LIMIT:-80} E2E_LIMIT=${E2E_LIMIT:-330} E2E_BUDGET=${E2E_BUDGET:-280} \
    ATTN=sagesla EXTRA=--skip-gemm-compare bash tools/device/gemm_e2e.sh
fi
true
