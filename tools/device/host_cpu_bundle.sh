#!/usr/bin/env bash
# Here, after a tools/device/suite.sh call whose cpu-bundle evaluation did not finish on the device: export the cpu
# bundle from the merged model and calibration plan the call returned ($OUT/models/) and evaluate it on this
# machine's CPU with the suite's settings (same prompts, seeds and batch size as the suite's teacher evaluation, so
# the per-video scores pair), then print the toy figures with that report as the cpu bundle's.
#
#   bash tools/device/host_cpu_bundle.sh FILES_AT [WORK_DIR]      # FILES_AT: the call's files_at folder
#
# PROMPTS / DIVERSITY (default: the digest's --prompts and min(32, --prompts)) shrink it for a quick check only:
# a report over other prompts than the teacher's does not pair. Add --write yourself to toy_figures to keep them.
set -euo pipefail
OUT=${1:?usage: host_cpu_bundle.sh FILES_AT [WORK_DIR]}
W=${2:-runs/host_cpu_bundle}
SUMMARY=$OUT/summary.json
[ -f "$SUMMARY" ] || { echo "host_cpu_bundle: no $SUMMARY (not a suite call's files?)" >&2; exit 2; }
[ -f "$OUT/models/calibration_plan.json" ] || { echo "host_cpu_bundle: no $OUT/models/calibration_plan.json" >&2; exit 2; }
MODEL=$(ls "$OUT"/models/merged*.safetensors 2>/dev/null | head -1)
[ -n "$MODEL" ] || { echo "host_cpu_bundle: no merged*.safetensors in $OUT/models" >&2; exit 2; }
read -r N BATCH < <(python3 -c "import json, sys; s = json.load(open(sys.argv[1]))['settings']; \
print(s.get('prompts', 256), s.get('eval_batch', 64))" "$SUMMARY")
N=${PROMPTS:-$N}
DIV=${DIVERSITY:-$(( N < 32 ? N : 32 ))}
mkdir -p "$W"
python3 -m turbo_train.export --checkpoint "$MODEL" --plan "$OUT/models/calibration_plan.json" --target cpu \
  --out "$W/bundles" --steps 4 --overwrite
turbo-eval --bundle "$W/bundles/cpu" --device cpu --num-prompts "$N" --batch-size "$BATCH" \
  --diversity-prompts "$DIV" --diversity-seeds 4 --out-dir "$W/eval_bundle_cpu"
python3 tools/toy_figures.py "$SUMMARY" --cpu-bundle-report "$W/eval_bundle_cpu/report.json"
