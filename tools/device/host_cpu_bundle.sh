#!/usr/bin/env bash
# Here, after a tools/device/suite.sh call whose cpu-bundle evaluation did not finish on the device: export the cpu
# bundle from the merged model and calibration plan the call returned ($OUT/models/) and evaluate it on this
# machine's CPU with the teacher evaluation's own settings from the digest (its prompts, seed and diversity
# prompts/seeds, and the suite's batch size, so the per-video scores pair), then print the toy figures with that
# report as the cpu bundle's.
#
#   bash tools/device/host_cpu_bundle.sh FILES_AT [WORK_DIR]      # FILES_AT: the call's files_at folder
#   ROUTE=student bash tools/device/host_cpu_bundle.sh FILES_AT   # --student-bundles: the student's own SLA tune
#
# PROMPTS / DIVERSITY shrink it for a quick check only: a report over other prompts than the teacher's does not
# pair. Add --write yourself to toy_figures to keep the figures.
set -euo pipefail
OUT=${1:?usage: host_cpu_bundle.sh FILES_AT [WORK_DIR]}
W=${2:-runs/host_cpu_bundle}
SUMMARY=$OUT/summary.json
[ -f "$SUMMARY" ] || { echo "host_cpu_bundle: no $SUMMARY (not a suite call's files?)" >&2; exit 2; }
if [ "${ROUTE:-merge}" = student ]; then  # --student-bundles: the student's own SLA fine-tune
  PLAN=$OUT/models/calibration_plan_student.json MODEL=$OUT/models/student_sla.safetensors NAME=bundle_student_cpu
  [ -f "$MODEL" ] || { echo "host_cpu_bundle: no $MODEL (a suite call without --student-bundles?)" >&2; exit 2; }
else
  PLAN=$OUT/models/calibration_plan.json NAME=bundle_cpu
  MODEL=$(ls "$OUT"/models/merged*.safetensors 2>/dev/null | head -1)
  [ -n "$MODEL" ] || { echo "host_cpu_bundle: no merged*.safetensors in $OUT/models" >&2; exit 2; }
fi
[ -f "$PLAN" ] || { echo "host_cpu_bundle: no $PLAN" >&2; exit 2; }
read -r N SEED DIV SEEDS BATCH < <(python3 -c "import json, sys; d = json.load(open(sys.argv[1])); \
t = d['reports']['teacher']['settings']; \
print(t['num_prompts'], t['seed'], t['diversity_prompts'], t['diversity_seeds'], d['settings']['eval_batch'])" "$SUMMARY") \
  || { echo "host_cpu_bundle: $SUMMARY has no teacher evaluation to pair with" >&2; exit 2; }
N=${PROMPTS:-$N}
DIV=${DIVERSITY:-$DIV}
mkdir -p "$W"
python3 -m turbo_train.export --checkpoint "$MODEL" --plan "$PLAN" --target cpu --out "$W/bundles_$NAME" --steps 4 \
  --overwrite
turbo-eval --bundle "$W/bundles_$NAME/cpu" --device cpu --num-prompts "$N" --seed "$SEED" --batch-size "$BATCH" \
  --diversity-prompts "$DIV" --diversity-seeds "$SEEDS" --out-dir "$W/eval_$NAME"
if [ "$NAME" = bundle_cpu ]; then
  python3 tools/toy_figures.py "$SUMMARY" --cpu-bundle-report "$W/eval_$NAME/report.json"
else  # the figures of the digest with this report added as bundle_student_cpu
  python3 tools/toy_figures.py "$SUMMARY" --report "$NAME=$W/eval_$NAME/report.json"
fi
