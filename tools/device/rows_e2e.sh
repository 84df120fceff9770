#!/usr/bin/env bash
# One device-tool call (session 29): the row kernels' warp counts and the q/k RoPE channel-pair access
# (bench_lowbit --only rows), then the end-to-end run with the fastest of each set for that run (bench_e2e --set;
# the defaults in the code are changed by hand afterwards if they win):
#   run(command="bash tools/device/rows_e2e.sh", carry=[".carry/whl", ".carry/whl_e2e"])
source tools/device/env.sh
set -o pipefail
mkdir -p "$OUT/b"
timeout "${ROWS_LIMIT:-120}" python3 tools/bench_lowbit.py --only rows > "$OUT/rows.log" 2>&1; echo "rows rc $?"
grep -E "^  (norm|qk|quant)|failed" "$OUT/rows.log" | tail -20
cp benchmarks/lowbit.json "$OUT/b/lowbit_rows.json" 2>/dev/null
SETS=$(python3 - <<'PY'
import json
f = json.load(open("benchmarks/lowbit.json"))["figures"]
def best(case):
    d, b = f.get(f"rows_{case}_default_ms"), f.get(f"rows_{case}_best_ms")
    return int(f[f"rows_{case}_best_warps"]) if d and b and b < 0.97 * d else None
out = []
w = best("norm_modulate_quant_fp8")
if w: out.append(f"--set turbo_kernels.gemm.norm_quant:NUM_WARPS={w}")
s, p = f.get("rows_qk_norm_rope_split_best_ms"), f.get("rows_qk_norm_rope_stride2_best_ms")
split = bool(s and p and s < 0.97 * p)
case = "qk_norm_rope_split" if split else "qk_norm_rope_stride2"
if split: out.append("--set turbo_kernels.attention.qk_norm_rope:SPLIT_PAIRS=True")
rw = int(f[f"rows_{case}_best_warps"]) if f.get(f"rows_{case}_best_ms") and f[f"rows_{case}_best_ms"] < 0.97 * f.get("rows_qk_norm_rope_stride2_default_ms", 1e9) else None
if rw: out.append(f"--set turbo_kernels.attention.qk_norm_rope:NUM_WARPS={rw}")
print(" ".join(out))
PY
)
echo "settings: ${SETS:-none}"
if [ -n "$SETS" ] && [ "${SKIP_E2E:-0}" != 1 ]; then
  timeout "${E2E_LIMIT:-330}" python3 tools/bench_e2e.py --skip-ttfv --skip-channels-last --budget-s "${E2E_BUDGET:-280}" \
    --attention sagesla --skip-gemm-compare --skip-static-scales $SETS 2>&1 | tee "$OUT/e2e.log" \
    | grep -v -E "it/s]|s/it]|__recompiles" | grep -E "set |eager|compiled|speedup|breakdown|_s = " | tail -30
  cp benchmarks/e2e.json "$OUT/b/" 2>/dev/null
fi
true
