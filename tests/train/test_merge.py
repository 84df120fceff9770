"""The SLA merge (turbo_train/merge.py): merged = student + w·(sla - teacher) plus the SLA-only proj_l,
on state dicts and on files through the CLI, with the errors for disagreeing keys, shapes and configs.
Tiny Wan config (width 32, 2 blocks), CPU. The arithmetic is checked in float32 against the formula
evaluated independently (atol 1e-6: one multiply-add per element on values of size ~1)."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors import safe_open

from turbo_infer.models.wan import WanConfig, WanModel
from turbo_infer.models.wan_keys import save_wan_checkpoint
from turbo_train import merge
from turbo_train.merge import merge_checkpoints, merge_state_dicts
from turbo_train.sla_convert import convert_to_sla, is_proj_l_key

TINY = dict(dim=32, ffn_dim=64, num_heads=2, num_layers=2, text_dim=16, in_channels=4, out_channels=4, freq_dim=32)
SLA_OPTS = dict(topk=0.25, block_q=32, block_k=16)


def perturbed(model: WanModel, scale: float, seed: int) -> WanModel:
    """`model` with every parameter moved by scale·N(0, 1) (stands in for a fine-tune / distillation)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return model


def three_models():
    """(teacher, rCM-like student, SLA fine-tune with nonzero proj_l), all from one dense teacher."""
    torch.manual_seed(0)
    teacher = WanModel(WanConfig(**TINY))
    with torch.no_grad():
        teacher.head.head.weight.normal_(std=0.05)
    student = perturbed(copy.deepcopy(teacher), 0.02, 1)
    sla = perturbed(convert_to_sla(teacher, **SLA_OPTS), 0.03, 2)  # moves the shared weights and proj_l
    return teacher, student, sla


# ----------------------------------------------------------------------------- arithmetic


@pytest.mark.parametrize("w", [1.0, 0.5, 0.0])
def test_merge_arithmetic_and_proj_l(w):
    teacher, student, sla = three_models()
    T, S, Q = teacher.state_dict(), student.state_dict(), sla.state_dict()
    merged, copied = merge_state_dicts(S, Q, T, weight=w)
    assert copied == sorted(k for k in Q if is_proj_l_key(k)) and len(copied) == 4
    assert set(merged) == set(Q)
    for k in T:
        expected = S[k] + w * (Q[k] - T[k])
        assert torch.allclose(merged[k], expected, atol=1e-6), k
    for k in copied:  # taken as tuned, whatever w is
        assert torch.equal(merged[k], Q[k]) and Q[k].abs().sum() > 0, k
    if w == 1.0:  # student = teacher -> merged = the SLA fine-tune itself
        same, _ = merge_state_dicts(T, Q, T, weight=1.0)
        for k in Q:
            assert torch.allclose(same[k], Q[k], atol=1e-6), k


def test_merge_dtypes():
    teacher, student, sla = three_models()
    S16 = {k: v.to(torch.bfloat16) for k, v in student.state_dict().items()}
    merged, copied = merge_state_dicts(S16, sla.state_dict(), teacher.state_dict())
    assert all(merged[k].dtype == torch.bfloat16 for k in S16)  # the student's dtype
    assert all(merged[k].dtype == torch.float32 for k in copied)  # proj_l keeps float32
    k = "blocks.0.ffn.0.weight"
    expected = S16[k].float() + (sla.state_dict()[k] - teacher.state_dict()[k])  # computed in fp32, then rounded
    assert torch.equal(merged[k], expected.to(torch.bfloat16))
    merged32, _ = merge_state_dicts(S16, sla.state_dict(), teacher.state_dict(), dtype=torch.float32)
    assert merged32[k].dtype == torch.float32


def test_merge_errors_name_the_keys():
    teacher, student, sla = three_models()
    T, S, Q = teacher.state_dict(), student.state_dict(), sla.state_dict()
    k = "blocks.1.self_attn.q.weight"
    with pytest.raises(ValueError, match=r"student and teacher keys differ: only in student \[\].*only in teacher \['blocks\.1"):
        merge_state_dicts({n: v for n, v in S.items() if n != k}, Q, T)
    with pytest.raises(ValueError, match=r"only in student \['blocks\.0\.self_attn\.attn\.proj_l\.bias'"):
        merge_state_dicts({**S, "blocks.0.self_attn.attn.proj_l.bias": torch.zeros(16)}, Q, T)
    with pytest.raises(ValueError, match=r"SLA model lacks teacher keys \['blocks\.1\.self_attn\.q\.weight'\]"):
        merge_state_dicts(S, {n: v for n, v in Q.items() if n != k}, T)
    with pytest.raises(ValueError, match=r"shapes disagree for 1 key\(s\): blocks\.1\.self_attn\.q\.weight: student \(32, 32\), sla \(32, 16\)"):
        merge_state_dicts(S, {**Q, k: torch.zeros(32, 16)}, T)
    with pytest.raises(ValueError, match="weight must be a finite number"):
        merge_state_dicts(S, Q, T, weight=float("nan"))


# ----------------------------------------------------------------------------- files and CLI


def write_three(tmp_path, diffusers_student: bool = False):
    teacher, student, sla = three_models()
    paths = {n: tmp_path / f"{n}.safetensors" for n in ("teacher", "student", "sla")}
    save_wan_checkpoint(teacher, paths["teacher"])
    save_wan_checkpoint(student, paths["student"], layout="diffusers" if diffusers_student else "official")
    save_wan_checkpoint(sla, paths["sla"])
    return (teacher, student, sla), paths


@pytest.mark.parametrize("diffusers_student", [False, True])
def test_cli_writes_a_loadable_merged_sla_model(tmp_path, capsys, diffusers_student):
    (teacher, student, sla), p = write_three(tmp_path, diffusers_student)
    out = tmp_path / "out" / "merged.safetensors"
    rc = merge.main(["--student", str(p["student"]), "--sla", str(p["sla"]), "--teacher", str(p["teacher"]),
                     "--out", str(out)])
    assert rc == 0 and "4 SLA-only tensors copied" in capsys.readouterr().out
    assert out.is_file() and not list(out.parent.glob("*.tmp"))  # written through a temp file + rename
    loaded = WanModel.from_pretrained(out)  # SLA config from the file's metadata
    assert loaded.config == sla.config and loaded.config.attention_options["topk"] == 0.25
    expected, _ = merge_state_dicts(student.state_dict(), sla.state_dict(), teacher.state_dict())
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, expected[k]), k
    with safe_open(str(out), framework="pt") as f:
        meta = f.metadata()
    sources = json.loads(meta["turbo_merge_sources"])
    assert meta["turbo_method"] == "sla_merge" and set(sources) == {"student", "sla", "teacher"}
    assert all(len(s["sha256"]) == 64 for s in sources.values())
    # the merged model runs (SLA self-attention with the tuned proj_l)
    x, t, c = torch.randn(1, 4, 4, 14, 14), torch.tensor([500.0]), torch.randn(1, 5, 16)
    with torch.no_grad():
        assert torch.isfinite(loaded(x, t, c)).all()


def test_student_equal_teacher_reproduces_the_sla_model_outputs(tmp_path):
    (teacher, _, sla), p = write_three(tmp_path)
    out = tmp_path / "m.safetensors"
    merge_checkpoints(p["teacher"], p["sla"], p["teacher"], out, topk=0.5)
    loaded = WanModel.from_pretrained(out)
    assert loaded.config.attention_options["topk"] == 0.5
    ref = convert_to_sla(sla, topk=0.5, block_q=32, block_k=16)
    x, t, c = torch.randn(2, 4, 4, 14, 14), torch.tensor([200.0, 700.0]), torch.randn(2, 5, 16)
    with torch.no_grad():
        assert torch.allclose(loaded(x, t, c), ref(x, t, c), atol=1e-5)


def test_cli_help_and_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        merge.main(["--help"])
    assert e.value.code == 0 and "--student" in capsys.readouterr().out
    _, p = write_three(tmp_path)
    args = ["--student", str(p["student"]), "--sla", str(p["sla"]), "--teacher", str(p["teacher"]), "--out", str(tmp_path / "o.safetensors")]

    def fails(argv, match):
        with pytest.raises(SystemExit) as e:
            merge.main(argv)
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert match in err, err

    fails(["--student", str(tmp_path / "nope.safetensors")] + args[2:], "--student: checkpoint not found")
    fails(args + ["--topk", "1.5"], "--topk must be in (0, 1]")
    # an SLA file that is not an SLA model (the dense teacher passed as --sla)
    fails(["--student", str(p["student"]), "--sla", str(p["teacher"])] + args[4:], "not an SLA backend")
    # a student of another architecture
    other = WanModel(WanConfig(**{**TINY, "ffn_dim": 48}))
    save_wan_checkpoint(other, tmp_path / "other.safetensors")
    fails(["--student", str(tmp_path / "other.safetensors")] + args[2:], "architecture differs from the teacher's")
    assert not (tmp_path / "o.safetensors").exists()
