"""A least-squares start for SLA's proj_l, instead of zeros.

SLA computes O = O_s + proj_l(O_l): O_s exact softmax attention over each query block's kept key blocks,
O_l linear attention over the rest. Converting a dense model gives proj_l = 0 (TurboDiffusion's start),
so at first the layer simply drops the mass of the marginal blocks. But the best linear map from O_l to
what is missing, the residual R = O_dense - O_s, can be solved in closed form from a few forwards of the
dense model:

    min_{W, b} sum over tokens and heads ||O_l W^T + b - R||^2 + ridge * ||W||^2

one (D + 1) x D ridge regression per layer (normal equations accumulated in float64 over the inputs).
The dense model's attention inputs q, k, v are taken by hooks on its self-attention backends; O_s and O_l
come from the SLA layer's own block map (turbo_kernels sparse_branch / linear_branch), so the fit sees
exactly the blocks the SLA layer keeps (the same token order too, when the SLA model has a token_tile).

Measured as a start for the README job's SLA stage (teacher v9, topk 0.2, 2 CPU cores, session 26;
recipes/toy/logs/readme_job_sla_route_cpu192_v9.json), after the 120-step tune, paired with zero proj_l on 192
prompts: a scratch fit on 16 videos at the rcm sampler's 4 times 0.819 vs 0.799 (+0.020 +- 0.014; untrained 0.772
vs 0.738 on 64 prompts), this method option (first batch, 4 videos at 4 training-distribution times) 0.778
(-0.020 +- 0.015). Not established either way: zero stays the default.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace

import torch

from turbo_infer.models.token_order import TOKEN_TILE
from turbo_infer.models.wan import WanModel
from turbo_kernels.attention.sla import linear_branch, sla_block_map_reference, sparse_branch
from turbo_train.sla_convert import sla_layers


@torch.no_grad()
def fit_proj_l(sla: WanModel, dense: WanModel, inputs: Iterable[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
               ridge: float = 1e-3) -> list[float]:
    """Set every proj_l of `sla` to the ridge least-squares map from its linear branch to the residual of its
    sparse branch against `dense`'s attention, on `inputs` ((x, timestep, context) triples for the models'
    forward). ridge: relative to the mean diagonal of the normal matrix, >= 0. Returns, per layer, the
    fraction of the residual's energy the fitted projection explains on those inputs (0 = none)."""
    layers = sla_layers(sla)
    if len(layers) != len(dense.blocks) or not layers:
        raise ValueError(f"sla: expected an SLA layer in each of the dense model's {len(dense.blocks)} blocks, "
                         f"got {len(layers)}")
    if ridge < 0:
        raise ValueError(f"ridge must be >= 0, got {ridge}")
    D = layers[0].head_dim
    # the normal equations per layer, float64 sums on the attention's own device: [X^T X, X^T R, R.R]
    sums: list = [None] * len(layers)

    def take(i: int):
        lay = layers[i]

        def hook(module, args, out):
            q, k, v = (t.float() for t in args)  # (B, H, L, D)
            bm = sla_block_map_reference(q, k, lay.topk, lay.block_q, lay.block_k)
            r = (out.float() - sparse_branch(q, k, v, bm)).reshape(-1, D).double()
            ol = linear_branch(q, k, v, bm, lay.feature_map).reshape(-1, D).double()
            x = torch.cat([ol, torch.ones_like(ol[:, :1])], dim=1)  # (N, D + 1)
            new = [x.T @ x, x.T @ r, (r * r).sum()]
            sums[i] = new if sums[i] is None else [a + b for a, b in zip(sums[i], new)]
        return hook

    # the dense model in the SLA model's token order, so that its q, k, v arrive as the SLA layers see them
    saved = dense.config
    tile = sla.config.attention_options.get(TOKEN_TILE)
    dense.config = replace(saved, attention_options={**saved.attention_options, TOKEN_TILE: tile})
    hooks = [b.self_attn.attn.register_forward_hook(take(i)) for i, b in enumerate(dense.blocks)]
    try:
        n = 0
        for x, t, ctx in inputs:
            dense(x, t, ctx)
            n += 1
    finally:
        for h in hooks:
            h.remove()
        dense.config = saved
    if n == 0:
        raise ValueError("fit_proj_l: no inputs")
    explained = []
    for lay, (xtx, xtr, rr) in zip(layers, sums):
        a = xtx + ridge * xtx.diagonal().mean() * torch.eye(D + 1, dtype=xtx.dtype, device=xtx.device)
        beta = torch.linalg.solve(a, xtr)  # (D + 1, D): [W^T; b]
        # residual energy after the fit: sum ||r - x beta||^2 = r.r - 2 tr(beta^T X^T R) + tr(beta^T X^T X beta)
        left = rr - 2 * (beta * xtr).sum() + (beta * (xtx @ beta)).sum()
        explained.append(float(1.0 - left / rr) if rr > 0 else 0.0)
        lay.proj_l.weight.copy_(beta[:D].T.to(lay.proj_l.weight))
        lay.proj_l.bias.copy_(beta[D].to(lay.proj_l.bias))
    return explained
