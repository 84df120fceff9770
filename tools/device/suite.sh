#!/usr/bin/env bash
# One device-tool call for the toy-world figures (issues 7, 8, 9), after tools/device/prep.sh:
#   run(command="MIN=4 EXTRA='--rcm-only --skip-ablations --rcm-variant seed1:trainer.seed=1' bash tools/device/suite.sh",
#       carry=[".carry/whl", ".carry/minilm"])
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
# the merged model the bundles were made from and its calibration plan (~14 MB): if the cpu bundle's evaluation on the
# device's CPU did not finish, the host exports and evaluates it from these: bash tools/device/host_cpu_bundle.sh FILES_AT
# (checked on a smoke run: the host's export and evaluation reproduce the device-side cpu bundle's per-video scores)
M=$(python3 -c "import json; b = json.load(open('runs/suite/summary.json'))['settings'].get('bundle_sla'); \
print(f'merged_{b}' if b else 'merged')" 2>/dev/null)
mkdir -p "$OUT/models" && cp "runs/suite/$M.safetensors" runs/suite/calibrate/calibration_plan.json "$OUT/models/" 2>/dev/null
# --student-bundles: the student's own SLA fine-tune and its plan too (ROUTE=student bash tools/device/host_cpu_bundle.sh)
[ -f runs/suite/calibrate_student/calibration_plan.json ] && cp runs/suite/sla_student/ema.safetensors \
  "$OUT/models/student_sla.safetensors" && cp runs/suite/calibrate_student/calibration_plan.json \
  "$OUT/models/calibration_plan_student.json"
true
