"""What a fresh process pays before its first video: the runtime's eager path must not import torch._dynamo
(~1 s: a custom op's first eager call, or arithmetic on meta tensors while a model to be filled from a
checkpoint is built, both pull it in). Checked in a clean interpreter."""
import subprocess
import sys

SCRIPT = r"""
import sys
import torch
from turbo_infer.layers import compile_ops as ops
from turbo_infer.models.umt5 import UMT5Config, UMT5Encoder
from turbo_infer.models.wan import WanConfig, WanModel
from turbo_infer.quant import W8A8Linear

with torch.device("meta"):  # as the bundle and umT5 loaders build them
    WanModel(WanConfig(dim=32, ffn_dim=64, num_heads=2, num_layers=2, text_dim=16, in_channels=4, out_channels=4))
    UMT5Encoder(UMT5Config(vocab_size=50, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=4))
W8A8Linear.from_linear(torch.nn.Linear(32, 24), mode="int8")(torch.randn(2, 32))  # the custom ops, eagerly
q = torch.randn(1, 2, 40, 16)
ops.sla_forward(q, q, q, None, None, 0.5, 16, 16, "softmax")
print("dynamo imported:", "torch._dynamo" in sys.modules)
"""


def test_eager_runtime_path_does_not_import_dynamo():
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "dynamo imported: False" in out.stdout, out.stdout

