"""What the modules that train one network with one optimizer share (flow matching, SLA fine-tuning):
the gradient-norm/LR log before each optimizer step and the EMA update after it.

The EMA's update count lives in the `ema_updates` buffer (saved in checkpoints, restored on resume)
and in a host-side mirror read from the buffer once per fit: an update then needs no device -> host
synchronisation (on a GPU a per-step `.item()` stalls the host until the step's kernels have run).
"""
from __future__ import annotations

import torch

from turbo_train import ema as ema_lib


class OneNetworkMixin:
    """Needs: self.ema (frozen copy or None), self.ema_updates (long buffer), self.recipe (ema section),
    and `trained_network()` -> the network being optimised (and averaged)."""

    _ema_k: int | None = None  # host mirror of ema_updates; None = read the buffer at the next update

    def trained_network(self) -> torch.nn.Module:
        raise NotImplementedError

    def on_fit_start(self) -> None:
        self._ema_k = None  # the buffer may have been restored from a checkpoint since the last fit

    def load_state_dict(self, *args, **kwargs):
        self._ema_k = None  # ema_updates comes from the state dict
        return super().load_state_dict(*args, **kwargs)

    def on_before_optimizer_step(self, optimizer) -> None:
        # global grad L2 norm before clipping (Lightning clips after this hook), and the LR
        grads = [p.grad for p in self.trained_network().parameters() if p.grad is not None]
        if grads:
            self.log("train/grad_norm", torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))), prog_bar=True)
        self.log("train/lr", optimizer.param_groups[0]["lr"], prog_bar=True)

    def optimizer_step(self, *args, **kwargs) -> None:
        super().optimizer_step(*args, **kwargs)
        self.update_ema()

    @torch.no_grad()
    def update_ema(self) -> None:
        """One EMA update after an optimizer step: ema <- beta(k)·ema + (1-beta(k))·theta, k = updates so far."""
        if self.ema is None:
            return
        k = self._ema_k if self._ema_k is not None else int(self.ema_updates.item())
        ema_lib.step_ema(self.ema, self.trained_network(), self.recipe.ema, k)
        self.ema_updates += 1
        self._ema_k = k + 1
