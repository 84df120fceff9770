#!/usr/bin/env bash
# One device-tool call for issue 4's high-noise expert (recipes/toy/README.md, "Where the direction is
# decided"), after tools/device/prep.sh:
#   run(command="bash tools/device/expert.sh", carry=[".carry/whl", ".carry/minilm_xz"])
# Trains the expert from teacher v6 on s in [BOUNDARY, 1) (clean s = 1 caption means mixed with high-noise flow
# matching, tools/caption_layout_probe.py), reads its first prediction's drift, then evaluates v6 with the expert
# above BOUNDARY on 256 prompts (turbo-eval --high-noise-expert). Everything lands under $OUT.
source tools/device/env.sh
set -o pipefail
B="${BOUNDARY:-0.9}"
timeout "${TRAIN_LIMIT:-330}" python3 tools/caption_layout_probe.py --targets toy --init teacher --device cuda \
  --scenes "${SCENES:-4096}" --renders 16 --steps "${STEPS:-1800}" --batch-size "${BATCH:-32}" --mix-flow "${BATCH:-32}" \
  --flow-min-time "$B" --log-every 300 --save "$OUT/expert.safetensors" --out "$OUT/expert_train.json" ${EXTRA} 2>&1 \
  | grep -v Loading | tee "$OUT/expert_train.log" | tail -8
timeout 80 python3 tools/toy_motion_probe.py --only-prior --checkpoint "$OUT/expert.safetensors" --device cuda \
  --out "$OUT/expert_prior.json" --no-progress 2>&1 | tail -3
timeout "${EVAL_LIMIT:-170}" python3 -m turbo_train.eval --high-noise-expert "$OUT/expert.safetensors" \
  --expert-boundary "$B" --num-prompts 256 --batch-size 64 --device cuda --out-dir "$OUT/eval" --no-progress 2>&1 \
  | grep -v Loading | tail -14
