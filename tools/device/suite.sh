#!/usr/bin/env bash
# One device-tool call for the toy-world figures (issues 7, 8, 9), after tools/device/prep.sh:
#   run(command="MIN=4 EXTRA='--rcm-only --skip-ablations --rcm-variant seed1:trainer.seed=1' bash tools/device/suite.sh",
#       carry=[".carry/whl", ".carry/minilm_xz"])
# The digest lands in $OUT/summary.json; tools/toy_figures.py turns it into benchmarks/*.json here.
source tools/device/env.sh
set -o pipefail
# a fresh suite every call: on a machine still warm from an earlier call, the trainings' checkpoint.resume=auto would
# find that call's last.ckpt past its time cap and stop at once (tools/device/teacher.sh met this in session 24)
rm -rf runs/suite
# LIMIT: seconds for the suite, under the call's 600 so that what it reached still comes back
timeout "${LIMIT:-540}" python3 tools/toy_gpu_suite.py --out runs/suite --minutes "${MIN:-3}" --prompts 256 ${EXTRA} 2>&1 \
  | tee "$OUT/suite.log" | grep -v -E "it/s|s/it"
# a run stopped by LIMIT wrote its digest before its last evaluations: re-read every report that finished
python3 tools/toy_gpu_suite.py --out runs/suite --refresh-digest
cp runs/suite/summary.json "$OUT/summary.json"
# every report and judge-feature file in one archive (the tool returns few files): the digest can be rebuilt here
(cd runs/suite && tar czf "$OUT/suite_eval.tgz" $(ls eval/*/report.json eval/*/features.npz logs/*.log 2>/dev/null))
# the model each route's bundles came from and its calibration plan, where that route's cpu-bundle evaluation did not
# finish here: the host exports and evaluates it from these (bash tools/device/host_cpu_bundle.sh FILES_AT, ROUTE=student
# for --student-bundles). One tar per route split into 15 MB parts ($OUT/models/ROUTE.tar.part_aa, ...): the tool returns
# files of at most 16 MB, 8 in all, and a merged toy model is ~29 MB in fp32.
pack() {  # pack ROUTE MODEL PLAN
  local d
  d=$(mktemp -d) && cp "$2" "$d/model.safetensors" && cp "$3" "$d/calibration_plan.json" || return 0
  mkdir -p "$OUT/models" && tar cf - -C "$d" model.safetensors calibration_plan.json | split -b 15M - "$OUT/models/$1.tar.part_"
}
M=$(python3 -c "import json; b = json.load(open('runs/suite/summary.json'))['settings'].get('bundle_sla'); \
print(f'merged_{b}' if b else 'merged')" 2>/dev/null)
[ -f runs/suite/eval/bundle_cpu/report.json ] || \
  pack merge "runs/suite/$M.safetensors" runs/suite/calibrate/calibration_plan.json
[ -f runs/suite/calibrate_student/calibration_plan.json ] && [ ! -f runs/suite/eval/bundle_student_cpu/report.json ] && \
  pack student runs/suite/sla_student/ema.safetensors runs/suite/calibrate_student/calibration_plan.json
true
