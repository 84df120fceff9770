#!/usr/bin/env bash
# One device-tool call timing the tensor-descriptor (TMA) variants of the attention kernels against the
# pointer kernels, in one process each (session 27):
#   run(command="bash tools/device/tma.sh", carry=[".carry/whl"])
# bench_attention --sweep: SLA sparse forward (fwd_tma, fwd_warp_spec, stages) and backward (bwd_tma) beside
# the pointer kernels, then the whole 1.3B forward/backward with the fastest; bench_lowbit: the dense low-bit
# and sagesla kernels with tma=True among the usual configs (correctness checks first). Logs and JSONs in $OUT.
source tools/device/env.sh
mkdir -p "$OUT/b"
timeout "${ATTN_LIMIT:-300}" python3 tools/bench_attention.py --sweep --shapes "${SHAPES:-1.3b}" --topks 0.1 \
  > "$OUT/attn.log" 2>&1; echo "attention rc $?"
grep -E "fwd |bwd |tma|tuned|topk 0.1:|failed|Error" "$OUT/attn.log" | tail -60
timeout "${LOWBIT_LIMIT:-260}" python3 tools/bench_lowbit.py --only "${LOWBIT_ONLY:-check,dense,sparse}" \
  > "$OUT/lowbit.log" 2>&1; echo "lowbit rc $?"
grep -E "ours_|cudnn|best|sagesla|sla_bf16|failed|Error|_tma" "$OUT/lowbit.log" | tail -50
cp benchmarks/attention.json benchmarks/lowbit.json "$OUT/b/" 2>/dev/null
true
