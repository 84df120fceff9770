"""One CUDA graph per DiT input signature: the whole forward replayed with a single launch.

A 4-step student does little work per kernel launch relative to its launch count (Wan-1.3B at 480p: 30 blocks ×
~40 kernels × 4 forwards, most of them custom ops whose Python wrappers and Triton launchers cost tens of
microseconds on the host each). On a host whose CPU cannot stay ahead of the GPU the DiT's wall time is then the
host's, not the kernels' (seen on a lent H100: eager 1.06 s against 0.75 s of kernel time). `GraphedDiT` records
the forward once per (shapes, dtypes, device) into a `torch.cuda.CUDAGraph` and replays it afterwards: every
kernel the forward launches, Triton, cuBLAS, cuDNN or Inductor's, runs from the graph without the host.

Requirements the DiT meets (`WanModel.forward`): no host synchronisation and no host-side branch on tensor values
(timesteps enter as a tensor), no random draws (the samplers draw noise between forwards), inference only. The
forward's own tensors live in the graph's private memory pool; the output is returned as a copy, since the next
replay overwrites it.
"""
from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)

__all__ = ["GraphedDiT"]


class GraphedDiT:
    """Callable like the model, model(x, timestep, context) -> velocity: on CUDA without autograd, a CUDA graph per
    input signature, recorded on the first call with that signature (after `warmup` eager runs on a side stream,
    which also compile every Triton kernel the forward launches; recording a launch that compiles would fail);
    elsewhere, or if recording fails, the model itself (the failure logged once per signature).

    model: the DiT (eager or with compiled blocks, but not torch.compile's own CUDA graphs, mode "reduce-overhead").
    The wrapped model's weights must not be reallocated afterwards (the graph holds their addresses); `reset()`
    drops the graphs and their memory."""

    def __init__(self, model, warmup: int = 2):
        if not isinstance(warmup, int) or isinstance(warmup, bool) or warmup < 1:
            raise ValueError(f"warmup must be an int >= 1 (eager runs before recording), got {warmup!r}")
        self.model = model
        self.warmup = warmup
        self._graphs: dict[tuple, tuple | None] = {}  # signature -> (graph, static inputs, static output) | None

    def __getattr__(self, name):  # config, patch_size, ...: the model's
        if name == "model":
            raise AttributeError(name)
        return getattr(self.model, name)

    @property
    def num_graphs(self) -> int:
        return sum(g is not None for g in self._graphs.values())

    def reset(self) -> None:
        self._graphs.clear()

    def __call__(self, x: torch.Tensor, timestep, context: torch.Tensor) -> torch.Tensor:
        if not x.is_cuda or torch.is_grad_enabled():
            return self.model(x, timestep, context)
        t = torch.as_tensor(timestep, device=x.device, dtype=torch.float32)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        key = tuple((tuple(a.shape), a.dtype, a.device) for a in (x, t, context))
        if key not in self._graphs:
            self._graphs[key] = self._record(x, t, context)
        entry = self._graphs[key]
        if entry is None:
            return self.model(x, t, context)
        graph, inputs, out = entry
        for dst, src in zip(inputs, (x, t, context)):
            dst.copy_(src)
        graph.replay()
        return out.clone()

    def _record(self, x, t, context):
        inputs = tuple(a.clone() for a in (x, t, context))
        main = torch.cuda.current_stream(x.device)
        side = torch.cuda.Stream(x.device)
        side.wait_stream(main)
        try:
            with torch.cuda.stream(side):
                for _ in range(self.warmup):
                    self.model(*inputs)
            main.wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = self.model(*inputs)
        except Exception as e:  # noqa: BLE001  (e.g. an op that synchronises: run eagerly instead)
            torch.cuda.synchronize(x.device)
            log.warning("CUDA graph recording of the DiT failed (%s: %s); this input signature runs eagerly",
                        type(e).__name__, str(e)[:300])
            return None
        return graph, inputs, out
