#!/usr/bin/env bash
# One device-tool call for the toy-world figures (issues 7, 8, 9), after tools/device/prep.sh:
#   run(command="MIN=4 EXTRA='--rcm-only --skip-ablations --rcm-variant seed1:trainer.seed=1' bash tools/device/suite.sh",
#       carry=[".carry/whl", ".carry/minilm"])
# The digest lands in $OUT/summary.json; tools/toy_figures.py turns it into benchmarks/*.json here.
source tools/device/env.sh
set -o pipefail
python3 tools/toy_gpu_suite.py --out runs/suite --minutes "${MIN:-3}" --prompts 256 ${EXTRA} 2>&1 \
  | tee "$OUT/suite.log" | grep -v -E "it/s|s/it"
cp runs/suite/summary.json "$OUT/summary.json"
