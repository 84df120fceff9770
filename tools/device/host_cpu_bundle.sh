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
ROUTE=${ROUTE:-merge}
case $ROUTE in merge) NAME=bundle_cpu ;; student) NAME=bundle_student_cpu ;;
  *) echo "host_cpu_bundle: ROUTE must be merge or student, got $ROUTE" >&2; exit 2 ;; esac
ls "$OUT/models/$ROUTE.tar.part_"* >/dev/null 2>&1 || { echo "host_cpu_bundle: no $OUT/models/$ROUTE.tar.part_* (the \
device evaluated that cpu bundle itself, or a suite call without --student-bundles for ROUTE=student)" >&2; exit 2; }
mkdir -p "$W/models_$ROUTE"
cat "$OUT/models/$ROUTE.tar.part_"* | tar xf - -C "$W/models_$ROUTE" \
  || { echo "host_cpu_bundle: $OUT/models/$ROUTE.tar.part_* do not make a whole archive" >&2; exit 2; }
MODEL=$W/models_$ROUTE/model.safetensors PLAN=$W/models_$ROUTE/calibration_plan.json
read -r N SEED DIV SEEDS BATCH < <(python3 -c "import json, sys; d = json.load(open(sys.argv[1])); \
t = d['reports']['teacher']['settings']; \
print(t['num_prompts'], t['seed'], t['diversity_prompts'], t['diversity_seeds'], d['settings']['eval_batch'])" "$SUMMARY") \
  || { echo "host_cpu_bundle: $SUMMARY has no teacher evaluation to pair with" >&2; exit 2; }
N=${PROMPTS:-$N}
DIV=${DIVERSITY:-$DIV}
python3 -m turbo_train.export --checkpoint "$MODEL" --plan "$PLAN" --target cpu --out "$W/bundles_$NAME" --steps 4 \
  --overwrite
turbo-eval --bundle "$W/bundles_$NAME/cpu" --device cpu --num-prompts "$N" --seed "$SEED" --batch-size "$BATCH" \
  --diversity-prompts "$DIV" --diversity-seeds "$SEEDS" --out-dir "$W/eval_$NAME"
if [ "$NAME" = bundle_cpu ]; then
  python3 tools/toy_figures.py "$SUMMARY" --cpu-bundle-report "$W/eval_$NAME/report.json"
else  # the figures of the digest with this report added as bundle_student_cpu
  python3 tools/toy_figures.py "$SUMMARY" --report "$NAME=$W/eval_$NAME/report.json"
fi
