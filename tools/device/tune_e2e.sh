#!/usr/bin/env bash
# One device-tool call for the options prepared in session 29 and not yet timed: the SLA linear state kernel's key
# blocks per program (bench_attention --sweep --sweep-fwd-only: SLAKernelConfig.state_blocks / state_warps), a
# dynamic FFN's hidden state in groups of 128 channels against per token (bench_lowbit --only group), then the
# end-to-end run with the winners set for that run (bench_e2e --set; a winner must beat the current default by
# > 3 % for the state, > 2 % for the FFN; the defaults in the code are changed by hand afterwards):
#   run(command="bash tools/device/tune_e2e.sh", carry=[".carry/whl", ".carry/whl_e2e"])
SKIP_E2E=1 bash tools/device/attention_e2e.sh  # the attention sweep (state variants included), its figures
source tools/device/env.sh
set -o pipefail
timeout "${GROUP_LIMIT:-150}" python3 tools/bench_lowbit.py --only group > "$OUT/group.log" 2>&1; echo "group rc $?"
grep -E "ffn_dyn|ffn_down|failed|vs_per_token|relerr" "$OUT/group.log" | tail -24
cp benchmarks/lowbit.json "$OUT/b/lowbit_group.json" 2>/dev/null
SETS=$(python3 - <<'PY'
import json
a = json.load(open("benchmarks/attention.json"))["figures"]
f = json.load(open("benchmarks/lowbit.json"))["figures"]
out = []
one, best = a.get("sla_state_ms_one_block_1.3b_topk0.1"), a.get("sla_state_ms_best_1.3b_topk0.1")
if one and best and best < 0.97 * one:
    out.append(f"--set turbo_kernels.attention.sla:DEFAULT_CONFIG.state_blocks={int(a['sla_state_best_blocks_1.3b_topk0.1'])}")
    out.append(f"--set turbo_kernels.attention.sla:DEFAULT_CONFIG.state_warps={int(a['sla_state_best_warps_1.3b_topk0.1'])}")
if f.get("w8a8_fp8_ffn_dynamic_groups_vs_per_token", 0) > 1.02:
    out.append("--set turbo_infer.layers.compile_ops:FFN_HIDDEN_GROUP=128")
print(" ".join(out))
PY
)
echo "settings: ${SETS:-none}"
if [ -n "$SETS" ] && [ "${SKIP_E2E:-0}" != 1 ]; then
  timeout "${E2E_LIMIT:-300}" python3 tools/bench_e2e.py --skip-ttfv --skip-text --skip-vae --skip-channels-last \
    --skip-gemm-compare --skip-static-scales --skip-attention-compare --skip-residual-compare \
    --budget-s "${E2E_BUDGET:-250}" --attention sagesla $SETS 2>&1 | tee "$OUT/e2e.log" \
    | grep -v -E "it/s]|s/it]|__recompiles" | grep -E "set |eager|compiled|speedup|breakdown|_s = " | tail -30
  cp benchmarks/e2e.json "$OUT/b/" 2>/dev/null
fi
true
