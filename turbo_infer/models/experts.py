"""Two denoisers of one flow, split at a boundary time: a high-noise and a low-noise expert.

Wan 2.2 splits its A14B denoiser this way: one network serves the noisy start of sampling, where the
layout and motion of the video are decided, the other the rest. The toy world needs the same for a
different reason (recipes/toy/README.md, "Where the direction is decided"): teacher v6 keeps the direction
of motion that the state at flow time 0.9 carries (adherence 0.97 started from a real video there), but
its own high-noise steps ignore the direction word, because the low-noise part of the flow-matching loss
sets its updates. A high-noise expert trained only on s >= boundary fixes that stretch and leaves the
rest of the teacher as it is.

`BoundaryExperts(low, high, boundary)` is called like a `WanModel` (x, timestep = 1000·s, context) and
sends each batch item to `high` when s >= boundary, else to `low` (a batch that mixes times is split,
each part run through its own expert). Samplers, `TurboPipeline.toy(high_noise_expert=)` and turbo-eval
take it in place of the DiT.
"""
from __future__ import annotations

import torch
from torch import nn


class BoundaryExperts(nn.Module):
    """`high` for flow times s >= boundary, `low` below; both map (x, 1000·s, context) -> velocity."""

    def __init__(self, low: nn.Module, high: nn.Module, boundary: float):
        super().__init__()
        if not isinstance(boundary, (int, float)) or isinstance(boundary, bool) or not 0.0 < boundary < 1.0:
            raise ValueError(f"boundary must be a flow time in (0, 1), got {boundary!r}")
        lc, hc = getattr(low, "config", None), getattr(high, "config", None)
        if lc is not None and hc is not None:
            for field in ("in_channels", "out_channels", "text_dim", "patch_size"):
                if getattr(lc, field) != getattr(hc, field):
                    raise ValueError(f"the high-noise expert's {field} ({getattr(hc, field)}) differs from the "
                                     f"low-noise model's ({getattr(lc, field)}): they must denoise the same latents "
                                     f"with the same text states")
        self.low, self.high, self.boundary = low, high, float(boundary)

    @property
    def config(self):
        """The low-noise model's config (sizes, attention): what callers read off the DiT."""
        return self.low.config

    def compile_blocks(self, backend: str = "inductor", mode: str | None = None) -> "BoundaryExperts":
        for net in (self.low, self.high):
            net.compile_blocks(backend, mode)
        return self

    def forward(self, x: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        B = x.shape[0]
        t = torch.as_tensor(timestep, device=x.device)
        if t.ndim == 0:
            t = t.expand(B)
        hi = t >= 1000.0 * self.boundary  # (B,) bool
        n_hi = int(hi.sum())
        if n_hi == B:
            return self.high(x, t, context)
        if n_hi == 0:
            return self.low(x, t, context)
        idx_hi, idx_lo = hi.nonzero().squeeze(1), (~hi).nonzero().squeeze(1)
        out_hi = self.high(x[idx_hi], t[idx_hi], context[idx_hi])
        out_lo = self.low(x[idx_lo], t[idx_lo], context[idx_lo])
        out = out_hi.new_empty((B,) + tuple(out_hi.shape[1:]))
        out[idx_hi], out[idx_lo] = out_hi, out_lo.to(out.dtype)
        return out
