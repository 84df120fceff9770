#!/usr/bin/env bash
# One device-tool call for the direction probe (issue 4), after tools/device/prep.sh:
#   run(command="MIN=4 bash tools/device/probe.sh", carry=[".carry/whl", ".carry/minilm_xz"])
# Both variants train MIN minutes each from a prerendered bank (--prerender, rendered by a process pool once),
# then sample and track the square; results, contact sheets and the log land under $OUT/direction.
source tools/device/env.sh
set -o pipefail
timeout "${LIMIT:-560}" python3 tools/direction_probe_train.py --device cuda --prerender "${BANK:-32768}" \
  --batch-size "${BATCH:-64}" --minutes "${MIN:-4}" --out "$OUT/direction" ${EXTRA} 2>&1 \
  | tee "$OUT/direction.log" | grep -v -E "step [0-9]*[1-9]00,|step [0-9]*50,"
