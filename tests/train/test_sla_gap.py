"""tools/sla_gap.py on a tiny teacher: the dense teacher against itself is 0, untrained SLA at a small
topk is not, a fine-tuned SLA file loads with its own settings; bad --model specs are refused."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))

import sla_gap  # noqa: E402

from turbo_infer.models.wan import WanConfig, WanModel  # noqa: E402
from turbo_infer.models.wan_keys import save_wan_checkpoint  # noqa: E402

TINY = WanConfig(dim=32, ffn_dim=64, num_heads=2, num_layers=2, text_dim=384, in_channels=48, out_channels=48)


@pytest.fixture()
def tiny_teacher(tmp_path):
    torch.manual_seed(0)
    model = WanModel(TINY).eval()
    for p in model.parameters():  # Wan zero-inits the head: give every weight some signal
        torch.nn.init.normal_(p, std=0.05)
    path = tmp_path / "teacher.safetensors"
    save_wan_checkpoint(model, path)
    return path


def test_dense_is_zero_and_untrained_sla_is_not(tiny_teacher, tmp_path, monkeypatch, capsys):
    from fakes import FakeTextEncoder

    monkeypatch.setattr("turbo_infer.text_encoders.MiniLMTextEncoder", lambda device: FakeTextEncoder())
    from turbo_train.sla_convert import convert_to_sla

    sla_file = tmp_path / "sla.safetensors"  # an "exported" SLA model: topk 1.0 with zero proj_l = dense
    save_wan_checkpoint(convert_to_sla(WanModel.from_pretrained(tiny_teacher), topk=1.0, block_q=16, block_k=16), sla_file)
    out = tmp_path / "gap.json"
    assert sla_gap.main(["--teacher", str(tiny_teacher), "--model", "d=dense", "--model", "u=untrained",
                         "--model", "u1=untrained:1.0", "--model", f"f={sla_file}", "--topk", "0.25", "--block-q", "16", "--block-k", "16",
                         "--num-videos", "3", "--batch-size", "2", "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    fig = doc["figures"]
    assert fig["d_velocity_rel_err"] == 0.0
    assert 0 < fig["u_velocity_rel_err"] < 10
    assert fig["u1_velocity_rel_err"] < 1e-6  # untrained at topk 1.0: dense
    assert fig["f_velocity_rel_err"] < 1e-6  # topk 1.0 + zero proj_l reproduces dense attention
    assert set(doc) >= {"device", "date", "command", "figures"} and len(doc["per_time"]["u"]) == len(sla_gap.DEFAULT_U)
    assert "relative velocity error" in capsys.readouterr().out


def test_refusals(tmp_path, capsys):
    for args, match in ((["--model", "nonsense"], "NAME=SPEC"),
                        (["--model", f"x={tmp_path / 'missing.safetensors'}"], "missing.safetensors"),
                        (["--model", "a=dense", "--model", "a=untrained"], "must differ"),
                        (["--model", "a=dense", "--topk", "0"], "--topk"),
                        (["--model", "a=untrained:2"], "untrained:TOPK")):
        with pytest.raises(SystemExit):
            sla_gap.main(args)
        assert match in capsys.readouterr().err
