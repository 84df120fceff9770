"""tools/bench_sla_layer.py --tiny: every case of the GPU tool runs on the CPU, and the model's strided
(B, L, H, D)-viewed inputs give the contiguous kernel's output (Triton interpreter vs torch reference
for the module)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))

import bench_sla_layer  # noqa: E402


@pytest.mark.parametrize("backend", ["sla", "sagesla"])
def test_tiny_cases_run_and_layouts_agree(backend, capsys):
    assert bench_sla_layer.main(["--tiny", "--backend", backend]) == 0
    out = capsys.readouterr().out
    for case in ("kernel_contiguous", "kernel_strided", "module", "rope_norm", "rope_norm_fused", "self_attention", "self_attention_sdpa"):
        assert f"{case} ok" in out


def test_strided_views_are_what_the_model_passes():
    s = bench_sla_layer.build(bench_sla_layer.TINY, "sla", 0.1, "cpu", torch.float32)
    q = s["strided"][0]
    assert not q.is_contiguous() and q.stride(-1) == 1 and q.shape == s["contiguous"][0].shape


def test_arguments_are_checked(capsys):
    with pytest.raises(SystemExit):
        bench_sla_layer.main(["--tiny", "--topk", "0"])
    assert "--topk" in capsys.readouterr().err
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit):
            bench_sla_layer.main([])
        assert "--tiny" in capsys.readouterr().err
