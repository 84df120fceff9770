#!/usr/bin/env bash
# One device-tool call for the time to first video alone (issue 9), after tools/device/prep.sh:
#   run(command="bash tools/device/ttfv.sh", carry=[".carry/whl", ".carry/whl_e2e"])
# bench_e2e without the baseline, profile, compile and comparisons: setup, the h100 bundle, the eager turbo DiT
# and RUNS fresh-process launches (launch 1 hashes the bundle and records it; later launches find the record
# and the Triton cache). Then EXTRA_LAUNCHES more children on the same bundle with VARIANT_ENV (e.g.
# TURBO_FASTLOAD_WORKERS=4; the children get the bench's default child flags only, so e.g. EXTRA=--ttfv-prewarm is
# compared against no prewarm). The bench runs `turbo-infer --prepare --bundle` once before its launches (its
# bytecode cache under $W/pycache serves the extra children too); PREPARE=off: no prepare, every child compiles
# its Python sources (TURBO_PYCACHE=0, as before session 15). EXTRA: more bench_e2e flags. Merge only the ttfv
# figures into benchmarks/e2e.json by hand. TRITON_KEY=0 skips the first-launch check (tools/bench_triton_key.py).
source tools/device/env.sh
set -o pipefail
# the first Triton launch of a fresh process with and without the early compiler key (turbo_kernels.triton_key);
# writes $OUT/triton_key.json
[ "${TRITON_KEY:-1}" = 1 ] && timeout 120 python3 tools/bench_triton_key.py --runs 3 2>&1 | tee "$OUT/triton_key.log" | tail -4
W=/tmp/e2e_ttfv
timeout 360 python3 tools/bench_e2e.py --workdir $W --skip-baseline --skip-profile --skip-static-scales --skip-compile \
  --skip-attention-compare --skip-channels-last --ttfv-runs "${RUNS:-3}" --ttfv-vae-dtype "${VAE_DTYPE:-bfloat16}" \
  --budget-s 300 --ttfv-prepare "${PREPARE:-on}" ${EXTRA} 2>&1 | tee "$OUT/e2e_ttfv.log" \
  | grep -v -E "it/s]|s/it]|__recompiles"
cp benchmarks/e2e.json "$OUT/e2e_ttfv.json"
for i in $(seq 1 "${EXTRA_LAUNCHES:-2}"); do
  env TURBO_PYCACHE_DIR=$W/pycache TURBO_PYCACHE="$([ "${PREPARE:-on}" = off ] && echo 0 || echo 1)" \
    ${VARIANT_ENV:-TURBO_FASTLOAD_WORKERS=4} \
    python3 tools/bench_e2e.py --ttfv-child $W/bundles/h100 --video $W/v.mp4 \
    --result "$OUT/variant_$i.json" --ttfv-vae-dtype "${VAE_DTYPE:-bfloat16}" \
    --launched "$(python3 -c 'import time; print(time.time())')" 2>&1 | tee -a "$OUT/variant.log"
done
