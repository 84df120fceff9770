#!/usr/bin/env bash
# One device-tool call for a toy-teacher experiment (issue 4), after tools/device/prep.sh: train a teacher
# (from scratch with recipes/toy/teacher.yaml by default; RECIPE=recipes/toy/teacher-anneal.yaml with
# CHECKPOINT=... anneals one), then the motion probe (time-reversal gap, direction word, sign of the motion)
# and a 256-prompt turbo-eval, all under the call's 600 s:
#   run(command="OVERRIDES='{prediction: x0, frame_embed_len: 8}' MIN=5.5 bash tools/device/teacher.sh",
#       carry=[".carry/whl", ".carry/minilm_xz"])
# OVERRIDES: model.overrides, replacing the recipe's whole mapping (keep prediction: x0 in it); network fields such as
# patch_size, frame_embed_len; MIN: training minutes;
# EXTRA: more --set arguments; DEVICE (cuda), PROMPTS (256) and PROBE (more toy_motion_probe flags) for a CPU smoke.
# Teachers v7-v9 (session 24) were three calls of, each from the previous call's ema.safetensors copied over the
# shipped asset (recipes/toy/teacher-direction.yaml writes the same settings down):
#   OVERRIDES='{prediction: x0, frame_embed_len: 8, space_embed_len: 16}' RECIPE=recipes/toy/teacher-anneal.yaml \
#   CHECKPOINT=turbo_infer/assets/toy_teacher.safetensors EXTRA='--set method.flow_matching.high_noise_fraction=0.3
#   --set method.flow_matching.high_noise_logit_mean=4 --set optim.position_table_lr_scale=10' \
#   MIN=5.5 bash tools/device/teacher.sh
# The EMA weights, metrics, probe and report come back under $OUT.
source tools/device/env.sh
set -o pipefail
RUN=runs/teacher_exp
# a fresh run every call: on a machine still warm from the last call, checkpoint.resume=auto would otherwise find
# that run's last.ckpt past its time cap and stop at once, exporting the previous call's EMA (it happened, s24)
rm -rf "$RUN"
sets=(--set "logging.run_dir=$RUN" --set logging.wandb=false --set "trainer.max_time_minutes=${MIN:-5.5}")
[ -n "$OVERRIDES" ] && sets+=(--set "model.overrides=$OVERRIDES")
[ -n "$CHECKPOINT" ] && sets+=(--set "model.checkpoint=$CHECKPOINT")
python3 -m turbo_train.cli "${RECIPE:-recipes/toy/teacher.yaml}" "${sets[@]}" ${EXTRA} 2>&1 | tee "$OUT/train.log" \
  | grep -v -E "it/s]|s/it]" | tail -30
cp "$RUN/ema.safetensors" "$OUT/" || exit 1
find "$RUN" -name metrics.csv -exec cp {} "$OUT/metrics.csv" \;
timeout 90 python3 tools/toy_motion_probe.py --checkpoint "$RUN/ema.safetensors" --device "${DEVICE:-cuda}" \
  --out "$OUT/probe.json" --no-progress ${PROBE} 2>&1 | tail -12
timeout 150 python3 -m turbo_train.eval --checkpoint "$RUN/ema.safetensors" --num-prompts "${PROMPTS:-256}" --batch-size 64 \
  --device "${DEVICE:-cuda}" --out-dir "$OUT/eval" --no-progress 2>&1 | tail -25
