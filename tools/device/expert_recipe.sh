#!/usr/bin/env bash
# One device-tool call for issue 4's high-noise expert trained by its recipe (recipes/toy/teacher-high-noise.yaml;
# recipes/toy/README.md, "The high-noise expert on a GPU"), after tools/device/prep.sh:
#   run(command="bash tools/device/expert_recipe.sh", carry=[".carry/whl", ".carry/minilm_xz"])
# Trains the expert for MIN minutes (default 6.5: at ~0.16 s a step on an H100 the recipe's 2 300 steps take ~6.2, so the
# schedule ends before the cap, and the call stays under the tool's 600 s; the device has no `turbo-train` on PATH, so the
# CLI runs as a module), reads its first prediction's drift, then evaluates v6 with the expert above 0.9 on
# PROMPTS prompts. Everything lands under $OUT (the checkpoints are dropped: only the 14 MB EMA export returns).
source tools/device/env.sh
set -o pipefail
MIN="${MIN:-6.5}"
timeout "$(python3 -c "print(int(${MIN} * 60 + 75))")" python3 -m turbo_train.cli recipes/toy/teacher-high-noise.yaml \
  --set logging.wandb=false --set logging.progress_bar=false --set "logging.run_dir=$OUT/hn" \
  --set "trainer.max_time_minutes=${MIN}" 2>&1 | tee "$OUT/expert_train.log" | tail -4
rm -rf "$OUT/hn/checkpoints"
timeout 60 python3 tools/toy_motion_probe.py --only-prior --checkpoint "$OUT/hn/ema.safetensors" --device cuda \
  --out "$OUT/expert_prior.json" --no-progress 2>&1 | tail -2
timeout "${EVAL_LIMIT:-90}" python3 -m turbo_train.eval --high-noise-expert "$OUT/hn/ema.safetensors" \
  --expert-boundary 0.9 --num-prompts "${PROMPTS:-128}" --batch-size 64 --device cuda --out-dir "$OUT/eval" \
  --no-progress 2>&1 | grep -v Loading | tail -14
