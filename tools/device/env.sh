# Sourced at the start of a device-tool command (see tools/device/prep.sh): the project and the carried
# wheels on PYTHONPATH (no pip install: the machine is offline), MiniLM from .carry, unbuffered output.
mkdir -p /tmp/site && ln -sfn "$PWD/kernels" /tmp/site/turbo_kernels
for w in .carry/whl/*.whl .carry/whl_e2e/*.whl; do [ -f "$w" ] && python3 -m zipfile -e "$w" /tmp/site; done
# MiniLM carried xz-compressed (.carry/minilm_xz/minilm.tar.xz, 41 MB against 46: the suite's tree + carry must stay
# under the tool's 64 MiB): unpacked once into .carry/minilm
if [ ! -d .carry/minilm ] && [ -f .carry/minilm_xz/minilm.tar.xz ]; then
  python3 -c "import tarfile; tarfile.open('.carry/minilm_xz/minilm.tar.xz').extractall('.carry', filter='data')"
fi
export PYTHONPATH=/tmp/site:$PWD TURBO_MINILM_PATH=$PWD/.carry/minilm PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
