#!/usr/bin/env bash
# One device-tool call for the options prepared in sessions 29-30 and not yet timed: the SLA linear state kernel's key
# blocks per program (bench_attention --sweep --sweep-fwd-only: SLAKernelConfig.state_blocks / state_warps), a
# dynamic FFN's hidden state in groups of 128 channels against per token (bench_lowbit --only group), the fp8 GEMMs'
# GELU from the hardware tanh and persistent / flattened tile loops (bench_lowbit --only gelu), then the
# end-to-end run with the winners set for that run (bench_e2e --set; a winner must beat the current default by
# > 3 % for the state, > 2 % for the FFN and the GEMM loop; the defaults in the code are changed by hand afterwards):
#   run(command="bash tools/device/tune_e2e.sh", carry=[".carry/whl", ".carry/whl_e2e"])
SKIP_E2E=1 bash tools/device/attention_e2e.sh  # the attention sweep (state variants included), its figures
source tools/device/env.sh
set -o pipefail
timeout "${GROUP_LIMIT:-200}" python3 tools/bench_lowbit.py --only group,gelu > "$OUT/group.log" 2>&1
echo "group rc $?"
grep -E "ffn_dyn|ffn_down|ffn_up|failed|vs_per_token|relerr|best|speedup" "$OUT/group.log" | tail -60
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
groups = f.get("w8a8_fp8_ffn_dynamic_groups_vs_per_token", 0) > 1.02
if groups:
    out.append("--set turbo_infer.layers.compile_ops:FFN_HIDDEN_GROUP=128")
# the GEMM tile loop: the FFN's up (GELU, the output the FFN path above takes) + down GEMMs per variant
up = "group128" if groups else "bf16"
loops = {"one_tile": "persistent=False flatten=False", "persistent": "persistent=True flatten=False",
         "flat_s4": "persistent=True flatten=True num_stages=4", "flat_s3": "persistent=True flatten=True num_stages=3"}
pair = {t: (f.get(f"gemm_fp8_ffn_up_gelu_approx_{t}_{up}_ms"), f.get(f"gemm_fp8_ffn_down_{t}_ms"))
        for t in ["default", *loops]}
pair = {t: a + b for t, (a, b) in pair.items() if a and b}
if "default" in pair and len(pair) > 1:
    best = min(pair, key=pair.get)
    if best != "default" and pair[best] < 0.98 * pair["default"]:
        out += [f"--set turbo_kernels.gemm.w8a8:DEFAULT_GEMM_CONFIG.{kv}" for kv in loops[best].split()]
print(" ".join(out))
PY
)
echo "settings: ${SETS:-none}"
if [ "${SKIP_E2E:-0}" != 1 ]; then  # also without winners: the code's own changes (the GELU) are on the DiT's path
  timeout "${E2E_LIMIT:-300}" python3 tools/bench_e2e.py --skip-ttfv --skip-text --skip-vae --skip-channels-last \
    --skip-gemm-compare --skip-static-scales --skip-attention-compare --skip-residual-compare \
    --budget-s "${E2E_BUDGET:-250}" --attention sagesla $SETS 2>&1 | tee "$OUT/e2e.log" \
    | grep -v -E "it/s]|s/it]|__recompiles" | grep -E "set |eager|compiled|speedup|breakdown|_s = " | tail -30
  cp benchmarks/e2e.json "$OUT/b/" 2>/dev/null
fi
true
