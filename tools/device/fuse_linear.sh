#!/usr/bin/env bash
# One device-tool call (prepared in session 32, not yet run): sagesla's linear branch in the sparse kernel's epilogue
# (SparseLowbitConfig.fuse_linear) against SLA's separate epilogue kernel, at the kernel level (bench_lowbit's
# sagesla section: sagesla_fused_linear_vs_default_1.3b_topk0.1 and the output difference) and in the 4-step DiT
# (bench_e2e --ab, interleaved), then the e2e headline with the faster:
#   run(command="bash tools/device/fuse_linear.sh", carry=[".carry/whl", ".carry/whl_e2e"])
source tools/device/env.sh
set -o pipefail
mkdir -p "$OUT/b"
timeout "${LOWBIT_LIMIT:-150}" python3 tools/bench_lowbit.py --only check,sparse 2>&1 | tee "$OUT/lowbit.log" \
  | grep -E "sagesla|sla_bf16|!!|Error" | tail -20
cp benchmarks/lowbit.json "$OUT/b/" 2>/dev/null
F=turbo_kernels.attention.lowbit_sparse:DEFAULT_SPARSE_CONFIG.fuse_linear=True
timeout "${E2E_LIMIT:-380}" python3 tools/bench_e2e.py --attention sagesla --budget-s 330 --skip-ttfv --skip-text \
  --skip-vae --skip-gemm-compare --skip-attention-compare --skip-residual-compare --skip-channels-last --skip-compile \
  --skip-other-scales --ab "fuselin=$F" --ab-rounds "${ROUNDS:-5}" \
  2>&1 | tee "$OUT/e2e.log" | grep -v -E "it/s]|s/it]" | grep -E "eager|speedup|A/B|CUDA graph|breakdown|_kernel|Error" \
  | tail -30
cp benchmarks/e2e.json "$OUT/b/" 2>/dev/null
true
