"""tools/profile_train_step.py on the CPU: a tiny teacher recipe runs its phases and writes the JSON;
methods with two optimizers are refused."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))

import profile_train_step  # noqa: E402

from fakes import FakeTextEncoder  # noqa: E402

TINY = "{dim: 32, ffn_dim: 64, num_heads: 2, num_layers: 2}"


def test_phases_and_json(tmp_path, monkeypatch):
    monkeypatch.setattr("turbo_train.methods.batching.build_text_encoder", lambda cfg, device: FakeTextEncoder())
    out = tmp_path / "p.json"
    res = profile_train_step.main([str(ROOT / "recipes/toy/teacher.yaml"), "--set", "data.batch_size=2",
                                   "--set", "data.num_workers=0", "--set", f"model.overrides={TINY}",
                                   "--set", "model.compile=false", "--set", "trainer.accelerator=cpu",
                                   "--steps", "2", "--no-profile", "--json", str(out)])
    saved = json.loads(out.read_text())
    assert saved == json.loads(json.dumps(res))
    assert set(saved["step_s"]) == set(profile_train_step.PHASES)
    assert all(v >= 0 for v in saved["step_s"].values()) and saved["step_s"]["fwd_bwd"] > 0
    assert saved["total_step_s"] >= saved["step_s"]["fwd_bwd"] and saved["batch_size"] == 2
    assert saved["compile"] is False  # the recipe's model.compile, as set


def test_refuses_two_optimizer_methods():
    with pytest.raises(SystemExit, match="not supported"):
        profile_train_step.main([str(ROOT / "recipes/toy/rcm.yaml"), "--steps", "1"])
