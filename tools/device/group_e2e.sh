#!/usr/bin/env bash
# One device-tool call: a dynamic FFN's hidden state per token vs in groups of 128 channels (bench_lowbit --only
# group), then, if the groups win by > 2 % for fp8, the end-to-end run with them (bench_e2e --set
# turbo_infer.layers.compile_ops:FFN_HIDDEN_GROUP=128; the default in the code is changed by hand afterwards):
#   run(command="bash tools/device/group_e2e.sh", carry=[".carry/whl", ".carry/whl_e2e"])
source tools/device/env.sh
set -o pipefail
mkdir -p "$OUT/b"
timeout "${GROUP_LIMIT:-150}" python3 tools/bench_lowbit.py --only group > "$OUT/group.log" 2>&1; echo "group rc $?"
grep -E "ffn_dyn|ffn_down|failed|_ms = |vs_per_token|relerr" "$OUT/group.log" | tail -30
cp benchmarks/lowbit.json "$OUT/b/lowbit_group.json" 2>/dev/null
WIN=$(python3 -c "import json; f = json.load(open('benchmarks/lowbit.json'))['figures']; print(int(f.get('w8a8_fp8_ffn_dynamic_groups_vs_per_token', 0) > 1.02))")
echo "groups win: $WIN"
if [ "$WIN" = 1 ] && [ "${SKIP_E2E:-0}" != 1 ]; then
  timeout "${E2E_LIMIT:-330}" python3 tools/bench_e2e.py --skip-ttfv --skip-channels-last --budget-s "${E2E_BUDGET:-280}" \
    --attention sagesla --skip-gemm-compare --skip-static-scales \
    --set turbo_infer.layers.compile_ops:FFN_HIDDEN_GROUP=128 2>&1 | tee "$OUT/e2e.log" \
    | grep -v -E "it/s]|s/it]|__recompiles" | grep -E "set |eager|compiled|speedup|breakdown|_s = " | tail -30
  cp benchmarks/e2e.json "$OUT/b/" 2>/dev/null
fi
true
