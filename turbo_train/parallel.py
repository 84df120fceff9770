"""Parallelism applied to the DiT from outside, after it is built (torchtitan's order):

    sequence parallel (Ulysses)  ->  activation checkpointing  ->  torch.compile  ->  FSDP2

1. Sequence parallel: `turbo_infer.sequence_parallel.enable_sequence_parallel(model, group)` splits
   every video's tokens over the ranks of one group (trainer.sequence_parallel ranks; all-to-all
   around self-attention). Those ranks see the same samples, so the data and the per-step noise are
   keyed by the data-parallel rank (rank // sequence_parallel).
2. Activation checkpointing: `WanModel.enable_activation_checkpointing` recomputes each block in
   backward (the flag the model's forward reads; model.activation_checkpointing of the recipe).
3. Compile: `torch.compile` of each block in place (model.compile), so parameter names do not change
   and FSDP wraps the compiled blocks.
4. FSDP2: `fully_shard` per block, then the root, over a 1-D mesh of ALL ranks (data parallel x
   sequence parallel), with MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32) when the
   trainer runs bf16-mixed: parameters are stored (and optimized) in fp32 shards, gathered in bf16
   for compute, gradients reduce-scattered in fp32. Inputs are not cast (cast_forward_inputs=False):
   the model keeps the timestep, RoPE tables and modulation in fp32 and Lightning's bf16 autocast
   covers the matmuls.

Gradient scaling with sequence parallelism: the loss is identical on the P ranks of a group (the
head's output is gathered), and each rank's backward yields the parameter-gradient contribution of
its own L/P tokens (every parameter sits before the gather), so the true gradient is their SUM over
the group and the MEAN over data-parallel groups. FSDP divides the reduce-scatter sum by the mesh size
dp·P, so the gradient entering the gather is multiplied by P (`_ScaleGrad`): (1/(dp·P))·Σ P·g = the
dp-mean of the group sums. (FSDP2's set_gradient_divide_factor would do the same with a PREMUL_SUM
reduce-scatter, which gloo lacks.)

Every Wan network of a LightningModule is handled (`wan_networks`: the trained one, a frozen teacher,
the EMA copy); frozen ones are sharded too (memory), without activation checkpointing. The model code
never imports torch.distributed: all of it lives here and in turbo_infer/sequence_parallel.py.
Each method module's `configure_model` hook calls `configure_module(self)`; Lightning calls it under
every strategy, and only the fsdp2 strategy (`FSDP2Strategy`) shards.
"""
from __future__ import annotations

import importlib
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from turbo_infer.models.wan import WanModel
from turbo_train.lightning_compat import pl

# ----------------------------------------------------------------------------- the plan for one network


def mixed_precision_policy(precision: str):
    """FSDP2 MixedPrecisionPolicy for a Lightning precision string; None = keep fp32 throughout.

    bf16-mixed -> bf16 gathered parameters, fp32 gradient reduction, inputs left as they are.
    32-true -> None. Anything else is refused (16-mixed needs a sharded GradScaler FSDP2 lacks here)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if precision == "bf16-mixed":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32, cast_forward_inputs=False)
    if precision == "32-true":
        return None
    raise ValueError(f"trainer.precision: {precision!r} is not supported with trainer.strategy fsdp2; use bf16-mixed "
                     "(GPU) or 32-true")


def parallelize_wan(model: WanModel, *, sp_group=None, activation_checkpointing: bool | int | None = None,
                    checkpoint_policy: str | None = None, compile: bool = False, fsdp_mesh=None, mp_policy=None,
                    scale_sp_grads: bool = True, reshard_after_forward: bool = True) -> WanModel:
    """Apply, in this order, Ulysses sequence parallel, activation checkpointing, compile and FSDP2 to one
    WanModel (in place; returns it).

    sp_group: process group of the Ulysses ranks; None (or a group of one) = no sequence parallel.
    activation_checkpointing: True/False or a number of blocks (the first N) sets the model's flag; None
        leaves it as built. checkpoint_policy: what a checkpointed block recomputes ("full" |
        "keep_attention", WanModel.enable_activation_checkpointing); None leaves it as built.
    compile: torch.compile each block in place.
    fsdp_mesh: 1-D DeviceMesh to shard over; None = no FSDP.
    mp_policy: FSDP2 MixedPrecisionPolicy; None = fp32.
    scale_sp_grads: multiply the gradient entering the sequence gather by P (see the module docstring);
        right when gradients are then AVERAGED over all ranks (FSDP over the whole mesh).
    reshard_after_forward: free gathered parameters after each block's forward (ZeRO-3 style); False
        keeps them until backward (ZeRO-2 style, more memory, fewer all-gathers).
    """
    if not isinstance(model, WanModel):
        raise TypeError(f"parallelize_wan expects a WanModel, got {type(model).__name__}")
    # 1. sequence parallel (Ulysses): shards tokens after the patch embedding, all-to-all around attention
    if sp_group is not None:
        from turbo_infer.sequence_parallel import enable_sequence_parallel

        enable_sequence_parallel(model, sp_group)
        if scale_sp_grads and model.sequence_shard is not None:
            _scale_gather_grads(model.sequence_shard)
    # 2. activation checkpointing: a flag read by WanModel.forward (torch.utils.checkpoint per block)
    if activation_checkpointing is not None or checkpoint_policy is not None:
        keep = model.gradient_checkpointing if activation_checkpointing is None else activation_checkpointing
        model.enable_activation_checkpointing(keep, checkpoint_policy)
    # 3. compile each block in place (parameter names unchanged: checkpoints and FSDP see the same keys)
    if compile:
        for block in model.blocks:
            block.compile()
    # 4. FSDP2: each block is one all-gather / reduce-scatter unit, the root holds the embeddings and head
    if fsdp_mesh is not None:
        from torch.distributed.fsdp import fully_shard

        kw = {"mesh": fsdp_mesh}
        if mp_policy is not None:
            kw["mp_policy"] = mp_policy
        for block in model.blocks:
            fully_shard(block, reshard_after_forward=reshard_after_forward, **kw)
        fully_shard(model, reshard_after_forward=reshard_after_forward, **kw)
    return model


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient by `scale`."""

    @staticmethod
    def forward(ctx, x, scale):
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.scale, None


def _scale_gather_grads(shard) -> None:
    """Make shard.gather (the token gather before the loss) scale its input's gradient by the group size."""
    if getattr(shard, "_turbo_scaled", False):
        return
    gather, P = shard.gather, shard.world

    def scaled_gather(x, dim: int = 1):
        return gather(_ScaleGrad.apply(x, float(P)), dim)

    shard.gather = scaled_gather
    shard._turbo_scaled = True


# ----------------------------------------------------------------------------- a LightningModule's networks


def wan_networks(module: nn.Module) -> dict[str, WanModel]:
    """The WanModel children of a method module, by attribute name (model / student / fake_score /
    teacher / ema), in registration order."""
    return {name: child for name, child in module.named_children() if isinstance(child, WanModel)}


def is_trained(net: nn.Module) -> bool:
    return any(p.requires_grad for p in net.parameters())


def is_sharded(net: nn.Module) -> bool:
    """Whether FSDP2 has sharded `net` (its parameters are DTensors)."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in net.parameters())


def configure_module(module) -> None:
    """Body of a method module's `configure_model` hook: parallelize its Wan networks as the trainer's
    strategy and the recipe say. Under fsdp2: sequence parallel (trainer.sequence_parallel > 1), the
    recipe's activation checkpointing on trained networks, compile (model.compile), FSDP2 over all
    ranks. Under other strategies: compile only (DDP and DeepSpeed wrap the module themselves).
    Idempotent (Lightning may call the hook again, e.g. for a later validate)."""
    if getattr(module, "_turbo_parallelized", False):
        return
    recipe = module.recipe
    trainer = module._trainer
    strategy = trainer.strategy if trainer is not None else None
    nets = wan_networks(module)
    if not isinstance(strategy, FSDP2Strategy):
        for net in nets.values():
            parallelize_wan(net, compile=recipe.model.compile)
        module._turbo_parallelized = True
        return

    from torch.distributed.device_mesh import init_device_mesh

    sp = strategy.sequence_parallel
    sp_group = strategy.device_mesh["tensor_parallel"].get_group() if sp > 1 else None
    fsdp_mesh = init_device_mesh(strategy.root_device.type, (strategy.world_size,))
    mp = mixed_precision_policy(trainer.precision)
    for name, net in nets.items():
        trained = is_trained(net)
        parallelize_wan(net, sp_group=sp_group,
                        activation_checkpointing=recipe.model.activation_checkpointing if trained else False,
                        checkpoint_policy=recipe.model.activation_checkpointing_policy,
                        compile=recipe.model.compile, fsdp_mesh=fsdp_mesh, mp_policy=mp)
    _export_through_gather(module)
    module._turbo_parallelized = True


# ----------------------------------------------------------------------------- export of sharded weights


def gather_full(net: nn.Module, rank0_only: bool = True) -> nn.Module | None:
    """A plain (unsharded, CPU) copy of an FSDP2-sharded WanModel: a collective, every rank must call it.
    Returns the copy on global rank 0 (on every rank with rank0_only=False), None elsewhere."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(net, options=StateDictOptions(full_state_dict=True, cpu_offload=True,
                                                              broadcast_from_rank0=False))
    if rank0_only and dist.get_rank() != 0:
        return None
    if not rank0_only and dist.get_rank() != 0:
        raise NotImplementedError("gather_full(rank0_only=False) is not needed by the exporters")
    cfg = net.config
    if cfg.attention == "sdpa_jvp":  # registers itself on import (rCM's student backend)
        importlib.import_module("turbo_infer.layers.jvp_attention")
    with torch.device("meta"):
        plain = WanModel(cfg)
    plain.load_state_dict(full, assign=True)
    return plain.requires_grad_(False).eval()


def _export_network_name(module) -> str | None:
    """The attribute a method's export_weights reads: the EMA copy, else the trained network."""
    if getattr(module, "ema", None) is not None:
        return "ema"
    for name in ("model", "student"):
        if isinstance(getattr(module, name, None), WanModel):
            return name
    return None


@contextmanager
def _swapped(module: nn.Module, name: str, replacement: nn.Module | None):
    if replacement is None:
        yield
        return
    saved = module._modules[name]
    module._modules[name] = replacement
    try:
        yield
    finally:
        module._modules[name] = saved


def _export_through_gather(module) -> None:
    """Make module.export_weights work on sharded networks: every rank gathers the exported network
    (a collective: export_weights is called on all ranks, from on_save_checkpoint and on_fit_end), rank 0
    writes from the plain copy. The method's own export code is unchanged (it runs on rank 0 only)."""
    name = _export_network_name(module)
    if name is None or not hasattr(module, "export_weights"):
        return
    export = module.export_weights  # the bound method of the class

    def export_weights(path: str | Path | None = None):
        plain = gather_full(module._modules[name])
        with _swapped(module, name, plain):
            return export(path)

    module.export_weights = export_weights


# ----------------------------------------------------------------------------- the Lightning strategy


class FSDP2Strategy(pl.strategies.ModelParallelStrategy):
    """Lightning's ModelParallelStrategy with a (data_parallel x sequence_parallel) mesh whose sizes are
    resolved from the world size, and checkpoints written atomically: a sharded checkpoint is a
    directory, written under <name>.tmp and swapped in by renames once complete (a crash leaves the
    previous checkpoint, or <name>.old during the swap, which `runner.resume_path` also accepts).

    sequence_parallel: ranks per Ulysses group (the mesh's inner dimension); 1 = pure FSDP.
    Other keyword arguments go to ModelParallelStrategy (e.g. save_distributed_checkpoint)."""

    def __init__(self, sequence_parallel: int = 1, **kwargs):
        super().__init__(**kwargs)
        if int(sequence_parallel) < 1:
            raise ValueError(f"sequence_parallel must be >= 1, got {sequence_parallel}")
        self.sequence_parallel = int(sequence_parallel)

    def setup_environment(self) -> None:
        # the world size is known here (devices x nodes, from the launcher / cluster environment)
        world = self.num_nodes * self.num_processes
        if world % self.sequence_parallel:
            raise ValueError(f"trainer.sequence_parallel: {self.sequence_parallel} does not divide the "
                             f"{world} processes of the job")
        self._data_parallel_size = world // self.sequence_parallel
        self._tensor_parallel_size = self.sequence_parallel  # inner mesh dim: the Ulysses groups
        super().setup_environment()

    def save_checkpoint(self, checkpoint, filepath, storage_options=None) -> None:
        path = Path(self.broadcast(str(filepath)))
        tmp = path.with_name(path.name + ".tmp")
        if self.global_rank == 0:
            _remove(tmp)
        self.barrier()
        super().save_checkpoint(checkpoint, tmp, storage_options)
        self.barrier()
        if self.global_rank == 0:
            _swap_in(tmp, path)
        self.barrier()

    def load_checkpoint(self, checkpoint_path, weights_only=None) -> dict:
        """Load a sharded checkpoint, tolerating FROZEN parameters it lacks (rCM and SLA leave their
        teacher out of training checkpoints: it is rebuilt from model.checkpoint); any other missing
        parameter is an error. Full (single-file) checkpoints go to Lightning's loader."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                             get_optimizer_state_dict, set_model_state_dict,
                                                             set_optimizer_state_dict)

        path = Path(self.broadcast(str(checkpoint_path)))
        if not (path.is_dir() and (path / "meta.pt").is_file()):
            return super().load_checkpoint(checkpoint_path, weights_only=weights_only)
        saved = set(dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata)
        model_state = get_model_state_dict(self.model)
        present = {k: v for k, v in model_state.items() if f"state_dict.{k}" in saved}
        frozen = {n for n, p in self.model.named_parameters() if not p.requires_grad}
        bad = sorted(k for k in model_state.keys() - present.keys() if k not in frozen or k.startswith("ema."))
        if bad:
            raise RuntimeError(f"{path}: the checkpoint lacks {len(bad)} trained or EMA tensor(s), e.g. {bad[:3]}")
        dcp.load({"state_dict": present}, checkpoint_id=str(path))
        set_model_state_dict(self.model, present, options=StateDictOptions(strict=False))
        for i, optimizer in enumerate(self.optimizers):
            state = {f"optimizer_{i}": get_optimizer_state_dict(self.model, optimizer)}
            dcp.load(state, checkpoint_id=str(path))
            set_optimizer_state_dict(self.model, optimizer, optim_state_dict=state[f"optimizer_{i}"],
                                     options=StateDictOptions(cpu_offload=True))
        metadata = torch.load(path / "meta.pt", weights_only=weights_only)
        metadata.setdefault("state_dict", {})  # for on_load_checkpoint hooks; the weights are already in place
        return metadata


def _remove(path: Path) -> None:
    import shutil

    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _swap_in(tmp: Path, path: Path) -> None:
    """Replace `path` (file or directory) by `tmp` with renames: path -> path.old, tmp -> path, drop .old."""
    import os

    old = path.with_name(path.name + ".old")
    _remove(old)
    if path.exists() or path.is_symlink():
        os.replace(path, old)
    os.replace(tmp, path)
    _remove(old)
