#!/usr/bin/env bash
# One device-tool call (session 33): the GPU correctness checks (bench_lowbit's check section, incl. sagesla's fused
# linear epilogue at head dims 128 and 64 against the separate epilogue kernel and the references) and the sagesla
# module timing with a random proj_l (the default sparse config only):
#   run(command="bash tools/device/check_fused.sh", carry=[".carry/whl"])
source tools/device/env.sh
set -o pipefail
timeout "${LIMIT:-300}" python3 tools/bench_lowbit.py --quick --only check,sparse 2>&1 | tee "$OUT/lowbit.log" \
  | grep -E "sagesla|sla_bf16|linear_epilogue|sparse_fp8|!!|Error|Traceback" | tail -40
cp benchmarks/lowbit.json "$OUT/" 2>/dev/null
true
