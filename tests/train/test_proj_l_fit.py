"""The least-squares start of SLA's proj_l (turbo_train/proj_l_fit.py) and method.sla.proj_l_init.

Tiny Wan config as tests/train/test_sla_finetune.py (196 tokens, 32x16 map blocks, ragged tails); fp32 on
the CPU's torch SLA path, seconds. The fit's own bookkeeping is checked against a direct recomputation."""
from __future__ import annotations

import pytest
import torch

from turbo_train.methods.sla import SLAFinetuneModule, check_sla_recipe
from turbo_train.proj_l_fit import fit_proj_l
from turbo_train.recipe import recipe_from_dict
from turbo_train.sla_convert import convert_to_sla, sla_layers
from fakes import FakeTextEncoder
from test_sla_finetune import BLOCKS, L_TEXT, TINY, dense_model, inputs, make_recipe

pytestmark = pytest.mark.usefixtures("one_thread")


def attention_inputs(model):
    """{block: (q, k, v, dense out)} of one forward of `model` on inputs()."""
    got = {}
    hooks = [b.self_attn.attn.register_forward_hook(lambda m, a, o, i=i: got.__setitem__(i, (*a, o)))
             for i, b in enumerate(model.blocks)]
    with torch.no_grad():
        model(*inputs())
    for h in hooks:
        h.remove()
    return got


@pytest.mark.parametrize("tile", [None, [2, 2, 2]])
def test_the_fit_explains_what_it_reports_and_brings_sla_closer_to_dense(tile):
    dense = dense_model().eval()
    sla = convert_to_sla(dense, topk=0.3, token_tile=tile, **BLOCKS).eval()
    with torch.no_grad():
        before = (sla(*inputs()) - dense(*inputs())).pow(2).mean()
    explained = fit_proj_l(sla, dense, [inputs()], ridge=0.0)
    assert len(explained) == 2 and all(0.0 < e <= 1.0 for e in explained)
    assert all(layer.proj_l.weight.abs().max() > 0 for layer in sla_layers(sla))
    # the reported fraction is the fitted layer's: recompute O_s + proj_l(O_l) against the dense attention
    # on the same q, k, v (taken in the SLA model's token order)
    from dataclasses import replace

    from turbo_kernels.attention.sla import linear_branch, sla_block_map_reference, sparse_branch

    saved = dense.config
    dense.config = replace(saved, attention_options={"token_tile": tile})
    taken = attention_inputs(dense)
    dense.config = saved
    for i, layer in enumerate(sla_layers(sla)):
        q, k, v, o = taken[i]
        bm = sla_block_map_reference(q, k, layer.topk, layer.block_q, layer.block_k)
        with torch.no_grad():
            r = o - sparse_branch(q, k, v, bm)
            left = r - layer.proj_l(linear_branch(q, k, v, bm, layer.feature_map))
        assert 1 - float(left.pow(2).sum() / r.pow(2).sum()) == pytest.approx(explained[i], abs=1e-4)
    with torch.no_grad():
        after = (sla(*inputs()) - dense(*inputs())).pow(2).mean()
    assert after < before  # on the inputs it was fitted on, the whole model moves towards the dense one


def test_fit_errors():
    dense = dense_model()
    with pytest.raises(ValueError, match="expected an SLA layer"):
        fit_proj_l(dense, dense, [inputs()])
    with pytest.raises(ValueError, match="no inputs"):
        fit_proj_l(convert_to_sla(dense, **BLOCKS), dense, [])
    with pytest.raises(ValueError, match="ridge"):
        fit_proj_l(convert_to_sla(dense, **BLOCKS), dense, [inputs()], ridge=-1)


def test_the_method_fits_before_its_first_step_and_its_emas_follow(tmp_path):
    r = make_recipe(tmp_path, proj_l_init="lstsq", proj_l_init_times=2)
    m = SLAFinetuneModule(r, teacher=dense_model(), text_encoder=FakeTextEncoder(length=L_TEXT, dim=TINY["text_dim"]))
    assert all(float(layer.proj_l.weight.abs().max()) == 0.0 for layer in sla_layers(m.student))
    x, _, c = inputs()
    m.fit_proj_l(x, c)
    assert m._proj_l_fitted
    for s_layer, e_layer in zip(sla_layers(m.student), sla_layers(m.ema)):
        assert s_layer.proj_l.weight.abs().max() > 0
        assert torch.equal(s_layer.proj_l.weight, e_layer.proj_l.weight) and torch.equal(s_layer.proj_l.bias, e_layer.proj_l.bias)
    # one process only: a multi-device recipe is refused before anything is built
    d = r.to_dict()
    d["trainer"] = {**d["trainer"], "devices": 2, "strategy": "ddp"}
    with pytest.raises(ValueError, match="method.sla.proj_l_init"):
        check_sla_recipe(recipe_from_dict(d))
    for bad, key in (({"proj_l_init": "pca"}, "proj_l_init"), ({"proj_l_init_times": 0}, "proj_l_init_times"),
                     ({"proj_l_init": "lstsq", "loss": "flow"}, "proj_l_init")):
        with pytest.raises(ValueError, match=f"method\\.sla\\.{key}"):
            make_recipe(tmp_path, **bad)
