#!/usr/bin/env bash
# One device-tool call (session 30): the end-to-end run with its baseline, the DiT's tuning variants timed
# interleaved with the code's defaults (bench_e2e --ab: the fp8 GEMMs' flattened persistent loop, the exact GELU,
# one key block per state program), the DiT replayed from CUDA graphs (turbo_infer.cuda_graph), then a second
# process with Inductor's max-autotune (no CUDA graphs of its own) for the compiled blocks:
#   run(command="bash tools/device/graph_e2e.sh", carry=[".carry/whl", ".carry/whl_e2e"])
source tools/device/env.sh
set -o pipefail
mkdir -p "$OUT/b"
W=turbo_kernels.gemm.w8a8
timeout "${E2E_LIMIT:-300}" python3 tools/bench_e2e.py --skip-ttfv --skip-text --skip-vae --skip-channels-last \
  --skip-gemm-compare --skip-static-scales --skip-attention-compare --skip-residual-compare \
  --budget-s "${E2E_BUDGET:-280}" --attention sagesla --ab-rounds "${ROUNDS:-4}" \
  --ab "flat=$W:DEFAULT_GEMM_CONFIG.persistent=True;$W:DEFAULT_GEMM_CONFIG.flatten=True" \
  --ab "exact_gelu=$W:GELU_APPROX=False" --ab "state1=turbo_kernels.attention.sla:DEFAULT_CONFIG.state_blocks=1" \
  2>&1 | tee "$OUT/e2e.log" | grep -v -E "it/s]|s/it]|__recompiles" \
  | grep -E "eager|compiled|speedup|breakdown|A/B|CUDA graph|_s = |_w8a8|_lowbit|_sla|_quant|Error" | tail -40
cp benchmarks/e2e.json "$OUT/b/" 2>/dev/null
if [ "${SKIP_AUTOTUNE:-0}" != 1 ]; then
  timeout "${TUNE_LIMIT:-200}" python3 tools/bench_e2e.py --skip-ttfv --skip-text --skip-vae --skip-channels-last \
    --skip-gemm-compare --skip-static-scales --skip-attention-compare --skip-residual-compare --skip-baseline \
    --skip-profile --budget-s 180 --attention sagesla --compile-mode max-autotune-no-cudagraphs \
    2>&1 | tee "$OUT/e2e_autotune.log" | grep -v -E "it/s]|s/it]|__recompiles" \
    | grep -E "eager|compiled|CUDA graph|Error" | tail -12
  cp benchmarks/e2e.json "$OUT/b/e2e_autotune.json" 2>/dev/null
fi
true
