#!/usr/bin/env bash
# One device-tool call for the toy-world figures (issues 7, 8, 9), after tools/device/prep.sh:
#   run(command="MIN=4 EXTRA='--rcm-only --skip-ablations --rcm-variant seed1:trainer.seed=1' bash tools/device/suite.sh",
#       carry=[".carry/whl", ".carry/minilm"])
# The digest lands in $OUT/summary.json; tools/toy_figures.py turns it into benchmarks/*.json here.
source tools/device/env.sh
set -o pipefail
# LIMIT: seconds for the suite, under the call's 600 so that what it reached still comes back
timeout "${LIMIT:-540}" python3 tools/toy_gpu_suite.py --out runs/suite --minutes "${MIN:-3}" --prompts 256 ${EXTRA} 2>&1 \
  | tee "$OUT/suite.log" | grep -v -E "it/s|s/it"
cp runs/suite/summary.json "$OUT/summary.json"
# every report and judge-feature file in one archive (the tool returns few files): the digest can be rebuilt here
(cd runs/suite && tar czf "$OUT/suite_eval.tgz" $(ls eval/*/report.json eval/*/features.npz logs/*.log 2>/dev/null))
