#!/usr/bin/env bash
# One device-tool call: does the tiled token order (method.sla.token_tile, turbo_infer.models.token_order) help the
# SLA fine-tune of the toy teacher? Two fine-tunes of recipes/toy/sla.yaml side by side on one GPU, same settings and
# time cap, raster vs TILE order, at TOPK; each fine-tuned teacher evaluated at 50 steps with CFG on 256 prompts (the
# suite's teacher settings, so the per-video scores pair with a suite digest's teacher), reports under $OUT.
#   run(command="TOPK=0.1 MIN=2 bash tools/device/tile_order.sh", carry=[".carry/whl", ".carry/minilm_xz"])
source tools/device/env.sh
set -o pipefail
R=runs/tile_order
rm -rf "$R" && mkdir -p "$R"
for v in raster tile; do
  extra=()
  [ "$v" = tile ] && extra=(--set "method.sla.token_tile=[${TILE:-4,2,2}]")
  python3 -m turbo_train.cli recipes/toy/sla.yaml --set "logging.run_dir=$R/$v" --set logging.wandb=false \
    --set "method.sla.topk=${TOPK:-0.1}" --set "trainer.max_time_minutes=${MIN:-2}" --set data.num_workers=6 \
    --set checkpoint.every_n_steps=1000000 "${extra[@]}" > "$OUT/train_$v.log" 2>&1 &
done
wait
for v in raster tile; do
  python3 -m turbo_train.eval --checkpoint "$R/$v/ema.safetensors" --num-prompts 256 --diversity-prompts 32 \
    --diversity-seeds 4 --batch-size 64 --out-dir "$R/eval_$v" --no-progress > "$OUT/eval_$v.log" 2>&1 &
done
wait
for v in raster tile; do cp "$R/eval_$v/report.json" "$OUT/report_$v.json"; tail -n 3 "$OUT/train_$v.log" | tr '\r' '\n' | tail -n 2; grep adherence "$OUT/eval_$v.log"; done
