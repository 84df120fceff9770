"""Conversion of a Wan DiT between dense self-attention and sparse-linear attention (SLA), both ways.

SLA (Zhang et al. 2025, arXiv 2509.24006; DESIGN.md "Sparse-linear attention") replaces each block's
SELF-attention by O = O_s + proj_l(O_l): exact softmax attention over each query block's top-k key
blocks plus linear attention over the rest, with a per-layer projection `proj_l` (Linear(D, D),
fp32, zero-initialised). Cross-attention to the text stays dense. In the Wan model the backend is the
module `blocks.N.self_attn.attn`, so the new parameters are `blocks.N.self_attn.attn.proj_l.{weight,
bias}`; every other parameter (q/k/v/o, norms, FFN, ...) is untouched by the swap.

    convert_to_sla(model, topk=0.1, block_q=128, block_k=64)   dense -> SLA (proj_l zeros, or kept if
                                                                the model already has SLA layers)
    convert_to_dense(model)                                     SLA -> sdpa, proj_l dropped (exact
                                                                inverse on the state-dict keys)

Both update `model.config` (WanConfig.attention / attention_options), so `save_wan_checkpoint`
writes a file that `WanModel.from_pretrained` rebuilds with the same backend. With proj_l = 0 and
topk = 1.0 the converted model computes the dense model's function (every key block is critical,
the linear branch covers no key, proj_l adds its zero bias): the unit tests check this.
"""
from __future__ import annotations

import copy
from dataclasses import replace

import torch
from torch import nn

from turbo_infer.layers.attention import SPARSE_BACKENDS, available_attention, make_attention
from turbo_infer.layers.sla import SparseLinearAttention
from turbo_infer.models.token_order import TOKEN_TILE, check_token_tile
from turbo_infer.models.wan import WanModel, backend_options

PROJ_L_SUFFIXES = (".self_attn.attn.proj_l.weight", ".self_attn.attn.proj_l.bias")


def sla_options(topk: float = 0.1, block_q: int = 128, block_k: int = 64, feature_map: str = "softmax",
                token_tile=None) -> dict:
    """The WanConfig.attention_options of an SLA model (validated by building one SLA module); token_tile:
    [frames, rows, columns] of the 3D tiles the DiT orders its tokens by (turbo_infer.models.token_order;
    None = raster order)."""
    SparseLinearAttention(16, topk=topk, block_q=block_q, block_k=block_k, feature_map=feature_map)  # raises, naming the option
    opts = {"topk": float(topk), "block_q": block_q, "block_k": block_k, "feature_map": feature_map}
    if token_tile is not None:
        opts[TOKEN_TILE] = list(check_token_tile(token_tile))
    return opts


def is_proj_l_key(key: str) -> bool:
    """Whether a state-dict key is an SLA projection (`blocks.N.self_attn.attn.proj_l.weight|bias`)."""
    return key.startswith("blocks.") and key.endswith(PROJ_L_SUFFIXES)


def sla_layers(model: WanModel) -> list[SparseLinearAttention]:
    """The SLA self-attention modules of `model`, one per block that has one."""
    return [b.self_attn.attn for b in model.blocks if isinstance(b.self_attn.attn, SparseLinearAttention)]


def _check_model(model) -> None:
    if not isinstance(model, WanModel):
        raise TypeError(f"model must be a turbo_infer WanModel, got {type(model).__name__}")


def convert_to_sla(model: WanModel, *, topk: float = 0.1, block_q: int = 128, block_k: int = 64,
                   feature_map: str = "softmax", backend: str = "sla", token_tile=None,
                   inplace: bool = False) -> WanModel:
    """Swap every block's self-attention backend for SLA; cross-attention stays dense.

    topk: fraction of key blocks kept exact per query block, in (0, 1]; block_q / block_k: tokens per
    query / key block of the block map (powers of two >= 16); feature_map: phi of the linear branch
    (softmax | elu | relu); backend: "sla" (trainable) or "sagesla" (low-bit sparse branch, inference);
    token_tile: order the tokens by 3D tiles of [frames, rows, columns] so that a block holds a tile
    (turbo_infer.models.token_order; None = raster order).
    A layer that already is SLA keeps its trained proj_l (only the options change); a dense layer gets
    a zero proj_l in float32 on the device of its q projection. inplace=False converts a deep copy.
    Returns the converted model, whose config reads attention=backend, attention_options={...}.
    """
    _check_model(model)
    if backend not in SPARSE_BACKENDS:
        raise ValueError(f"backend must be one of {SPARSE_BACKENDS}, got {backend!r}")
    opts = sla_options(topk, block_q, block_k, feature_map, token_tile)
    if not inplace:
        model = copy.deepcopy(model)
    for block in model.blocks:
        sa = block.self_attn
        new = make_attention(backend, sa.head_dim, **backend_options(opts))
        old = sa.attn
        if isinstance(old, SparseLinearAttention):  # re-conversion: keep the trained projection
            new.proj_l = old.proj_l
        else:
            new.to(device=sa.q.weight.device)  # proj_l stays float32 (SparseLinearAttention._apply)
        new.proj_l.requires_grad_(sa.q.weight.requires_grad)
        sa.attn = new
    model.config = replace(model.config, attention=backend, attention_options=dict(opts))
    return model


def convert_to_dense(model: WanModel, *, attention: str = "sdpa", inplace: bool = False) -> WanModel:
    """Swap SLA self-attention back to a dense backend (default sdpa), dropping every proj_l.

    The inverse of `convert_to_sla` on the state dict: the result has exactly the keys of the model
    before conversion. (Its function is the dense model's, which differs from the SLA one unless
    topk = 1 and proj_l = 0.) inplace=False converts a deep copy."""
    _check_model(model)
    if attention in SPARSE_BACKENDS or attention not in available_attention():
        dense = [a for a in available_attention() if a not in SPARSE_BACKENDS]
        raise ValueError(f"attention must be a dense backend, one of {dense}, got {attention!r}")
    if not inplace:
        model = copy.deepcopy(model)
    for block in model.blocks:
        sa = block.self_attn
        new: nn.Module = make_attention(attention, sa.head_dim)
        sa.attn = new.to(device=sa.q.weight.device)
    model.config = replace(model.config, attention=attention, attention_options={})
    return model


@torch.no_grad()
def proj_l_norms(model: WanModel) -> torch.Tensor:
    """(num SLA layers,) Frobenius norms of the proj_l weights: 0 right after conversion, growing as
    fine-tuning moves work into the linear branch (a cheap training diagnostic)."""
    layers = sla_layers(model)
    if not layers:
        return torch.zeros(0)
    return torch.stack([m.proj_l.weight.detach().float().norm() for m in layers])  # on the model's device
