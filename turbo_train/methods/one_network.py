"""What the modules that train one network with one optimizer share (flow matching, SLA fine-tuning):
the gradient-norm/LR log before each optimizer step, the EMA update after it, and the export of the
(EMA) weights as a standalone safetensors file.

The EMA's update count is the `ema_updates` counter (turbo_train/methods/counters.py: a checkpointed
buffer with a host-side mirror, so that an update needs no device -> host synchronisation).
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

import torch

from turbo_train import ema as ema_lib
from turbo_train.methods.counters import CountersMixin


def export_on_checkpoint(module, step: int | None = None) -> None:
    """At each checkpoint: refresh the module's export (checkpoint.export_ema, `module.export_weights()`),
    and with checkpoint.export_snapshots also keep it as <name>_step<step>.safetensors (step None = the
    trainer's global step, 0 without a trainer)."""
    ck = module.recipe.checkpoint
    if not ck.export_ema:
        return
    path = module.export_weights()
    export_extra_emas(module)
    if path is not None and ck.export_snapshots:
        if step is None:
            step = module._trainer.global_step if module._trainer is not None else 0
        from turbo_infer.files import copy_file

        copy_file(path, path.with_name(f"{path.stem}_step{step:06d}{path.suffix}"))


def export_extra_emas(module) -> list[Path]:
    """Write each extra EMA (ema.extra_sigma_rels, `module.ema_extra`) as <export_dir>/ema_sr<width>.safetensors
    through the module's own `export_weights(path, net=, weights=)`; the paths written (none off rank 0 or
    without an export_dir)."""
    if module.ema_extra is None or module.export_dir is None:
        return []
    written = []
    for net, width in zip(module.ema_extra, module.recipe.ema.extra_sigma_rels, strict=True):
        path = module.export_weights(module.export_dir / ema_lib.extra_ema_name(width), net=net,
                                     weights=f"ema sigma_rel {float(width):g}")
        if path is not None:
            written.append(path)
    return written


class OneNetworkMixin(CountersMixin):
    """Needs: self.ema (frozen copy or None), self.ema_extra (`ema.extra_copies`, or None), the counter `ema_updates` (register_counters), self.recipe (ema and
    checkpoint sections), self.export_dir (Path or None), `trained_network()` -> the network being
    optimised (and averaged), `export_metadata()` -> the method's own safetensors metadata, and
    `raw_weights_name`: the export's file name without EMA."""

    raw_weights_name = "model.safetensors"

    def trained_network(self) -> torch.nn.Module:
        raise NotImplementedError

    def export_metadata(self) -> dict[str, str]:
        raise NotImplementedError

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
        """One EMA update after an optimizer step: ema <- beta(k)·ema + (1-beta(k))·theta, k = updates so far
        (the extra widths too, `ema_extra`)."""
        if self.ema is None:
            return
        ema_lib.step_ema(self.ema, self.trained_network(), self.recipe.ema, self.count("ema_updates"), self.ema_extra)
        self.bump("ema_updates")

    # ------------------------------------------------------------------ export

    def export_weights(self, path: str | Path | None = None, net: torch.nn.Module | None = None,
                       weights: str | None = None) -> Path | None:
        """Write the EMA weights (the trained weights if ema.kind is none; `net` = another copy, e.g. an extra
        EMA, labelled `weights` in the metadata) in checkpoint.export_dtype as a standalone safetensors with the
        WanConfig and `export_metadata()` in its metadata (loadable by WanModel.from_pretrained with no config).
        Default path: <export_dir>/ema.safetensors (<export_dir>/<raw_weights_name> without EMA). Returns the
        path, or None where nothing is written (no export_dir, not rank 0)."""
        if path is None:
            if self.export_dir is None:
                return None
            path = self.export_dir / ("ema.safetensors" if self.ema is not None else self.raw_weights_name)
        if self._trainer is not None and not self.trainer.is_global_zero:
            return None
        from turbo_infer.models.wan_keys import save_wan_checkpoint

        if net is None:
            net = self.ema if self.ema is not None else self.trained_network()
            weights = "ema" if self.ema is not None else "raw"
        dtype = getattr(torch, self.recipe.checkpoint.export_dtype)
        if next(net.parameters()).dtype != dtype:
            net = copy.deepcopy(net).to(dtype)  # SLA's proj_l stays float32 (SparseLinearAttention keeps it)
        meta = {
            **self.export_metadata(),
            "turbo_weights": weights or "ema",
            "turbo_ema_updates": str(self.count("ema_updates")),
            "turbo_recipe": json.dumps(self.recipe.to_dict()),
        }
        save_wan_checkpoint(net, path, extra_metadata=meta)
        return Path(path)
