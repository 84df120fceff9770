"""Ulysses sequence parallelism for the Wan DiT (Jacobs et al., "DeepSpeed Ulysses", 2023).

Each rank of a sequence-parallel group holds L/P of the video tokens. Self-attention needs every
token, so around it two all-to-alls swap the sharded dimension: tokens-sharded (B, H, L/P, D) →
heads-sharded (B, H/P, L, D) → attention on full sequences for H/P heads → back. Everything else in
a block (linears, norms, modulation, cross-attention to the replicated text) is token-local.

Applied from outside the model (the model never imports torch.distributed):
`enable_sequence_parallel(model, group)` wraps every self-attention backend in `UlyssesAttention`
and installs a `SequenceShard` that the model uses to shard tokens (and RoPE tables) after the patch
embedding and to gather them before the head. The token count is padded to a multiple of P; padded
keys are masked out of attention by construction (they are dropped before attention: the gathered
full sequence is cut back to the true length inside UlyssesAttention).
Forward-mode AD (rCM's JVP) passes through: all_to_all_single is linear, and tangents travel with
the primals when this runs inside torch.func.jvp with a differentiable collective.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


def _all_to_all(x: torch.Tensor, scatter_dim: int, gather_dim: int, group) -> torch.Tensor:
    """Split x along scatter_dim into P chunks, send chunk i to rank i, concatenate received along gather_dim."""
    world = dist.get_world_size(group)
    if world == 1:
        return x
    inputs = [c.contiguous() for c in x.chunk(world, dim=scatter_dim)]
    outputs = [torch.empty_like(inputs[0]) for _ in range(world)]
    dist.all_to_all(outputs, inputs, group=group)
    return torch.cat(outputs, dim=gather_dim)


class _AllToAll(torch.autograd.Function):
    """all_to_all with its adjoint (the reverse all_to_all) as backward."""

    @staticmethod
    def forward(ctx, x, scatter_dim, gather_dim, group):
        ctx.dims, ctx.group = (scatter_dim, gather_dim), group
        return _all_to_all(x, scatter_dim, gather_dim, group)

    @staticmethod
    def backward(ctx, grad):
        s, g = ctx.dims
        return _all_to_all(grad, g, s, ctx.group), None, None, None


def all_to_all(x, scatter_dim: int, gather_dim: int, group=None):
    return _AllToAll.apply(x, scatter_dim, gather_dim, group)


class _Gather(torch.autograd.Function):
    """all_gather along a dim; backward keeps this rank's slice of the gradient."""

    @staticmethod
    def forward(ctx, x, dim, group):
        ctx.dim, ctx.group = dim, group
        world = dist.get_world_size(group)
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=dim)

    @staticmethod
    def backward(ctx, grad):
        rank, world = dist.get_rank(ctx.group), dist.get_world_size(ctx.group)
        return grad.chunk(world, dim=ctx.dim)[rank].contiguous(), None, None


class SequenceShard:
    """Shards the token sequence of one forward across the group (pads L to a multiple of P)."""

    def __init__(self, group=None):
        self.group = group
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.seq_len = None  # true (unpadded) length of the current forward

    def shard(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """(…, L, …) -> this rank's (…, ceil(L/P), …) slice, zero-padded at the end."""
        self.seq_len = L = x.shape[dim]
        pad = (-L) % self.world
        if pad:
            shape = list(x.shape)
            shape[dim] = pad
            x = torch.cat([x, x.new_zeros(shape)], dim=dim)
        return x.chunk(self.world, dim=dim)[self.rank]

    def gather(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        full = _Gather.apply(x, dim, self.group)
        return full.narrow(dim, 0, self.seq_len)


class UlyssesAttention(nn.Module):
    """Wraps a self-attention backend: tokens-sharded in, heads-sharded attention, tokens-sharded out."""

    def __init__(self, inner: nn.Module, shard: SequenceShard):
        super().__init__()
        self.inner = inner
        self.shard = shard

    def forward(self, q, k, v):
        # q, k, v: (B, H, L/P, D) local tokens (padded)
        P = self.shard.world
        if q.shape[1] % P:
            raise ValueError(f"Ulysses needs heads ({q.shape[1]}) divisible by the sequence-parallel size ({P})")
        L = self.shard.seq_len
        qf, kf, vf = (all_to_all(t, 1, 2, self.shard.group)[:, :, :L] for t in (q, k, v))  # (B, H/P, L, D)
        o = self.inner(qf, kf, vf)  # (B, H/P, L, D)
        pad = (-L) % P
        if pad:
            o = torch.cat([o, o.new_zeros(o.shape[0], o.shape[1], pad, o.shape[3])], dim=2)
        return all_to_all(o, 2, 1, self.shard.group)  # (B, H, L/P, D)


def enable_sequence_parallel(model: nn.Module, group=None) -> nn.Module:
    """Make `model` (a WanModel) run Ulysses sequence parallel over `group` (None = world)."""
    if not dist.is_initialized():
        raise RuntimeError("enable_sequence_parallel needs torch.distributed to be initialized")
    shard = SequenceShard(group)
    if shard.world == 1:
        return model
    if model.config.num_heads % shard.world:
        raise ValueError(f"num_heads={model.config.num_heads} is not divisible by the sequence-parallel size {shard.world}")
    for block in model.blocks:
        if not isinstance(block.self_attn.attn, UlyssesAttention):
            block.self_attn.attn = UlyssesAttention(block.self_attn.attn, shard)
    model.sequence_shard = shard
    return model
