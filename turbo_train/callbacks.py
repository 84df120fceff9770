"""Lightning callbacks (and one checkpoint plugin) that make long cluster runs safe and observable.

    DeterministicSteps   exact resume: noise/time/dropout reseeded per (step, micro-batch slot); data
                         position and every rank's RNG states saved in the checkpoint
    PreemptionHandler    SIGTERM / SIGUSR1 -> finish the optimizer step, checkpoint, exit 143
    NonFiniteGuard       NaN/Inf loss or gradient -> that step is skipped (no update) and counted; stop
                         with a checkpoint after trainer.max_nonfinite_steps in a row
    ThroughputMonitor    samples/s, step time, model TFLOP/s, MFU, peak memory
    DataSkipMonitor      corrupted shards / samples skipped by the shard reader
    ProgressLines        a plain progress line every log_every_n_steps (runs without a progress bar:
                         batch jobs whose output goes to a log file)
    AtomicCheckpointIO   single-file checkpoints written to a temporary file, fsync'ed, renamed

Exact resume, and why 1 process equals N: every micro-batch has a slot j = dp_rank·A + a (A =
accumulate_grad_batches, a = micro-batch within the step, dp_rank = data-parallel rank). The data
stream (`runner.ToyBatchStream`) gives slot j of optimizer step g the samples
[g·G + j·B, g·G + (j+1)·B) (G = B·dp·A, the global batch), and before that micro-batch the global
torch RNG is seeded with hash(seed, g, j). A run's randomness is therefore a function of (seed, step,
slot) only: a resumed run replays it exactly, and a run with dp·A fixed (2 processes x 1 micro-batch,
or 1 process x 2 micro-batches) sees the same samples with the same noise in every slot.
"""
from __future__ import annotations

import math
import os
import resource
import signal
import time
from pathlib import Path

import numpy as np
import torch

from turbo_train.lightning_compat import Callback, pl, rank_zero_info

# ----------------------------------------------------------------------------- helpers


def _dist_world() -> int:
    d = torch.distributed
    return d.get_world_size() if d.is_available() and d.is_initialized() else 1


def _any_rank(flag: bool, device) -> bool:
    """True if `flag` is set on any rank (one all-reduce of one number when distributed)."""
    if _dist_world() == 1:
        return bool(flag)
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return bool(t.item() > 0)


def data_parallel_slot(trainer) -> tuple[int, int]:
    """(data-parallel rank, data-parallel size) of this process: ranks of one sequence-parallel group
    share a slot (they process the same samples)."""
    kw = getattr(trainer.strategy, "distributed_sampler_kwargs", None) or {}
    return int(kw.get("rank", 0)), max(1, int(kw.get("num_replicas", 1)))


def step_seed(seed: int, step: int, slot: int) -> int:
    """63-bit seed of micro-batch slot `slot` of optimizer step `step` (numpy SeedSequence hashing)."""
    return int(np.random.SeedSequence([int(seed), int(step), int(slot)]).generate_state(1, np.uint64)[0] >> 1)


# ----------------------------------------------------------------------------- exact resume


class DeterministicSteps(Callback):
    """Per-micro-batch seeds, the data position and the RNG states: what a bitwise resume needs.

    seed: trainer.seed. accumulate: trainer.accumulate_grad_batches. batch_size: samples per micro-batch.
    train_stream: the `runner.ToyBatchStream` to position on resume; None for data that cannot be
        positioned (shards), which then restarts from the beginning of its stream (not exact).
    other_streams: further ToyBatchStreams (validation) that only need their data-parallel rank.
    """

    def __init__(self, seed: int, accumulate: int, batch_size: int, train_stream=None, other_streams=()):
        self.seed, self.accumulate, self.batch_size = int(seed), int(accumulate), int(batch_size)
        self.train_stream = train_stream
        self.streams = [s for s in (train_stream, *other_streams) if s is not None]
        self._micro = 0
        self._start_samples = 0  # samples consumed before this run's first step (from the checkpoint)
        self._start_step = 0
        self._rng_to_restore = None

    def global_batch(self, trainer) -> int:
        return self.batch_size * data_parallel_slot(trainer)[1] * self.accumulate

    def samples_seen(self, trainer) -> int:
        """Training samples consumed by all ranks up to trainer.global_step (a partial accumulation
        at a stop is dropped: checkpoints sit on optimizer-step boundaries)."""
        return self._start_samples + (trainer.global_step - self._start_step) * self.global_batch(trainer)

    def setup(self, trainer, pl_module, stage: str) -> None:
        # the process group and the device mesh exist here, before any DataLoader iterator
        rank, size = data_parallel_slot(trainer)
        for s in self.streams:
            s.set_data_parallel(rank, size)

    def on_train_start(self, trainer, pl_module) -> None:
        self._micro = 0
        self._start_step = trainer.global_step
        if self._rng_to_restore is not None:
            _set_rng_state(self._rng_to_restore)
            self._rng_to_restore = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        a = self._micro % self.accumulate
        self._micro += 1
        rank, _ = data_parallel_slot(trainer)
        torch.manual_seed(step_seed(self.seed, trainer.global_step, rank * self.accumulate + a))

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        # called on every rank (Lightning dumps the checkpoint everywhere, rank 0 writes it)
        states = [_get_rng_state()]
        if _dist_world() > 1:
            states = [None] * _dist_world()
            torch.distributed.all_gather_object(states, _get_rng_state())
        checkpoint["turbo_data"] = {"samples_seen": self.samples_seen(trainer), "global_step": trainer.global_step,
                                    "global_batch": self.global_batch(trainer)}
        checkpoint["turbo_rng"] = states

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        data = checkpoint.get("turbo_data")
        if data is not None:
            self._start_samples = int(data["samples_seen"])
            if self.train_stream is not None:
                self.train_stream.start = self._start_samples
        states = checkpoint.get("turbo_rng")
        if states:
            rank = torch.distributed.get_rank() if _dist_world() > 1 else 0
            if len(states) == _dist_world():
                self._rng_to_restore = states[rank]
            else:
                rank_zero_info(f"turbo-train: checkpoint holds RNG states of {len(states)} ranks, this job has "
                               f"{_dist_world()}: not restoring them (per-step seeds keep the run deterministic)")


def _get_rng_state() -> dict:
    """This process's RNG states as tensors and plain numbers (loadable with torch.load(weights_only=True))."""
    import random

    name, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    state = {"torch": torch.get_rng_state(),
             "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
                       "cached_gaussian": float(cached)},
             "python": {"version": version, "internal": torch.tensor(internal, dtype=torch.int64), "gauss": gauss}}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    import random

    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(int(v) for v in p["internal"].tolist()), p["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# ----------------------------------------------------------------------------- preemption

EXIT_PREEMPTED = 143  # 128 + SIGTERM: "stopped by the scheduler"; the SLURM template requeues on it


class PreemptionHandler(Callback):
    """SIGTERM or SIGUSR1 (SLURM sends one before preemption or the time limit: `--signal=USR1@120`)
    -> the current optimizer step completes, every rank agrees (one all-reduce per step), training
    stops, and the checkpoint callback writes a step checkpoint and last.ckpt at that step. The runner
    then exits with EXIT_PREEMPTED. A run loses at most the steps since its last checkpoint (a hard
    kill), none if the signal comes at least one step before the kill.

    The handlers are installed at train start (replacing Lightning's SIGTERM handler, which would stop
    without a checkpoint) and restored at train end."""

    def __init__(self, signals=(signal.SIGTERM, signal.SIGUSR1)):
        self.signals = tuple(signals)
        self.received: int | None = None  # the first signal number seen by this rank
        self.preempted = False  # training stopped because some rank got a signal
        self._previous = {}
        self._last_step = None

    def _handle(self, signum, frame) -> None:
        if self.received is None:
            self.received = signum

    def on_train_start(self, trainer, pl_module) -> None:
        self._last_step = trainer.global_step
        for s in self.signals:
            self._previous[s] = signal.signal(s, self._handle)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self._last_step:
            return  # inside a gradient accumulation: only stop on optimizer-step boundaries
        self._last_step = trainer.global_step
        if _any_rank(self.received is not None, trainer.strategy.root_device):
            self.preempted = True
            trainer.should_stop = True
            name = signal.Signals(self.received).name if self.received else "a signal on another rank"
            rank_zero_info(f"turbo-train: received {name}: stopping after step {trainer.global_step} with a "
                           f"checkpoint (exit code {EXIT_PREEMPTED}; resume with checkpoint.resume: auto)")

    def _restore(self) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)
        self._previous = {}

    def on_train_end(self, trainer, pl_module) -> None:
        self._restore()

    def teardown(self, trainer, pl_module, stage: str) -> None:
        self._restore()


# ----------------------------------------------------------------------------- non-finite steps


class NonFiniteGuard(Callback):
    """Skips optimizer steps whose loss (any micro-batch, any rank) or gradient is NaN/Inf, and logs the
    loss of the whole global batch.

    At each optimizer step one all-reduce carries [sum of this rank's backward losses, non-finite flag]
    (Lightning divides each micro-batch loss by accumulate_grad_batches before backward, so the sum is
    the rank's mean): train/loss_global = their sum / world size = the loss of the global batch, the
    same number whatever the split into processes and micro-batches (ranks of a sequence-parallel group
    hold the same loss, so the mean over all ranks is still the mean over data-parallel slots).

    A skipped step drops the gradients before the optimizer sees them (AdamW leaves parameters and
    moments untouched), is counted in train/nonfinite_skipped, and still advances the step counter,
    the LR schedule and the EMA's update count (the EMA then averages unchanged weights). After
    `max_consecutive` skipped steps in a row training stops with a checkpoint (0 = never); the runner
    raises NonFiniteStop. Under a GradScaler (16-mixed) inf gradients are the scaler's business and
    only the loss is checked. DeepSpeed steps its own engine: the guard counts and stops there but
    cannot drop the gradients (DeepSpeed's own overflow check applies).
    """

    def __init__(self, max_consecutive: int = 20):
        self.max_consecutive = int(max_consecutive)
        self.skipped = 0  # steps skipped so far (restored on resume)
        self.consecutive = 0
        self.stopped = False
        self.loss_global = None  # host float: the last optimizer step's global-batch loss
        self._loss_sum = None  # device tensor: this rank's backward losses since the last optimizer step

    def state_dict(self) -> dict:
        return {"skipped": self.skipped, "consecutive": self.consecutive}

    def load_state_dict(self, state: dict) -> None:
        self.skipped, self.consecutive = int(state.get("skipped", 0)), int(state.get("consecutive", 0))

    def on_before_backward(self, trainer, pl_module, loss) -> None:
        loss = loss.detach().float().sum()
        self._loss_sum = loss if self._loss_sum is None else self._loss_sum + loss

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        params = [p for g in optimizer.param_groups for p in g["params"]]
        device = trainer.strategy.root_device
        loss = (self._loss_sum if self._loss_sum is not None else torch.zeros(())).to(device)
        self._loss_sum = None
        bad = ~torch.isfinite(loss)
        if getattr(trainer.precision_plugin, "scaler", None) is None:
            grads = [_local(p.grad) for p in params if p.grad is not None]
            if grads:
                bad = bad | ~torch.isfinite(torch.stack(torch._foreach_norm(grads))).all().to(device)
        packed = torch.stack([loss, bad.float()])
        world = _dist_world()
        if world > 1:
            torch.distributed.all_reduce(packed)
        loss_global, any_bad = packed.tolist()
        self.loss_global = loss_global / world
        pl_module.log("train/loss_global", self.loss_global)
        if not any_bad:
            self.consecutive = 0
            pl_module.log("train/nonfinite_skipped", float(self.skipped))
            return
        for p in params:
            p.grad = None  # AdamW skips parameters without a gradient: no update, no moment change
        self.skipped += 1
        self.consecutive += 1
        pl_module.log("train/nonfinite_skipped", float(self.skipped))
        rank_zero_info(f"turbo-train: non-finite loss or gradient at step {trainer.global_step}: step skipped "
                       f"({self.consecutive} in a row, {self.skipped} in all)")
        if self.max_consecutive and self.consecutive >= self.max_consecutive:
            self.stopped = True
            trainer.should_stop = True


def _local(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard (FSDP2 gradients), else the tensor."""
    return t.to_local() if hasattr(t, "to_local") else t


class NonFiniteStop(RuntimeError):
    """Training stopped after trainer.max_nonfinite_steps skipped steps in a row."""


# ----------------------------------------------------------------------------- throughput, MFU, memory

# Dense peak tensor throughput, TFLOP/s, from the vendors' data sheets (no sparsity), by compute dtype
# of the matmuls: bf16 (bf16-mixed), tf32 (fp32 with matmul_precision high/medium), fp32 (highest).
PEAK_TFLOPS = {
    "H100 SXM": {"bf16": 989.4, "tf32": 494.7, "fp32": 66.9},
    "H100 PCIe": {"bf16": 756.0, "tf32": 378.0, "fp32": 51.2},
    "H200": {"bf16": 989.4, "tf32": 494.7, "fp32": 66.9},
    "A100": {"bf16": 312.0, "tf32": 156.0, "fp32": 19.5},
}


def gpu_peak_tflops(device_name: str, precision: str, matmul_precision: str = "high") -> float | None:
    """Peak TFLOP/s of a GPU (torch.cuda.get_device_name) for a Lightning precision; None if unknown."""
    if "H200" in device_name:
        row = PEAK_TFLOPS["H200"]
    elif "H100" in device_name and "NVL" not in device_name:
        row = PEAK_TFLOPS["H100 PCIe" if "PCIe" in device_name else "H100 SXM"]
    elif "A100" in device_name:
        row = PEAK_TFLOPS["A100"]
    else:
        return None
    if precision in ("bf16-mixed", "16-mixed"):
        return row["bf16"]
    return row["tf32" if matmul_precision in ("high", "medium") else "fp32"]


def wan_forward_flops(cfg, video_tokens: int, text_tokens: int) -> float:
    """Model FLOPs of one WanModel forward on ONE sample (multiply-add = 2 FLOPs).

    With d = dim, f = ffn_dim, n = num_layers, T video tokens and Lc text tokens:
      per block: self-attn q,k,v,o 2·4d²·T; scores + weighted sum 2·2·T²·d; cross-attn q,o 2·2d²·T,
                 k,v on the text 2·2d²·Lc, scores + sum 2·2·T·Lc·d; FFN 2·2·d·f·T
      outside:   patch embedding 2·(C_in·pt·ph·pw)·d·T, head 2·d·(C_out·pt·ph·pw)·T,
                 text embedding 2·(text_dim·d + d²)·Lc
    i.e. 2·N_tok·T + 2·N_text·Lc + 4·n·d·(T² + T·Lc): "2·N·tokens plus the attention term"; norms,
    modulation, RoPE and the time embedding (O(d·T) or per-sample) are left out."""
    d, f, n = cfg.dim, cfg.ffn_dim, cfg.num_layers
    p = math.prod(cfg.patch_size)
    T, Lc = float(video_tokens), float(text_tokens)
    per_token = n * (4 * d * d + 2 * d * d + 2 * d * f) + cfg.in_channels * p * d + d * cfg.out_channels * p
    per_text = n * 2 * d * d + cfg.text_dim * d + d * d
    attention = n * 4 * d * (T * T + T * Lc)
    return 2 * per_token * T + 2 * per_text * Lc + attention


def wan_train_flops(cfg, video_tokens: int, text_tokens: int) -> float:
    """Training FLOPs of one sample through a trained WanModel: forward + backward = 3 forwards
    (backward = 2x forward: gradients w.r.t. activations and weights), i.e. 6·N·tokens + 3x the
    attention term. Activation-checkpointing recompute is NOT counted (model FLOPs, not hardware FLOPs)."""
    return 3 * wan_forward_flops(cfg, video_tokens, text_tokens)


class ThroughputMonitor(Callback):
    """Logs at the end of each window of `window` optimizer steps, averaged over it (the GPU synchronizes, and
    these metrics are logged, at window ends only):
    train/samples_per_s (all ranks together), train/step_s, train/model_tflops_per_s (this rank),
    train/mfu (model FLOPs / (time · peak), when the GPU's peak is known), and train/peak_mem_gib
    (CUDA: peak allocated memory of this rank) or train/peak_rss_gib (CPU: peak resident memory of this
    process).

    Model FLOPs are counted at every WanModel forward of the LightningModule during training steps
    (forward pre-hooks read the latent and text shapes): `wan_train_flops` when gradients flow into the
    network's parameters, `wan_forward_flops` for frozen ones (a teacher). Forward-mode JVPs (rCM's
    tangents) are not counted, so rCM's MFU is a lower bound. Under sequence parallelism each rank
    counts 1/P of its group's forwards.
    precision / matmul_precision: the trainer's, to pick the peak.
    """

    def __init__(self, window: int = 10, precision: str = "32-true", matmul_precision: str = "high"):
        self.window = max(1, int(window))
        self.precision, self.matmul_precision = precision, matmul_precision
        self._t0 = None
        self._step0 = 0
        self._samples = 0
        self._flops = 0.0
        self._in_step = False
        self._hooks = []
        self._peak = None
        self.samples_per_s = None
        self.step_s = None
        self.tflops = None
        self.mfu = None

    def _sync(self, pl_module):
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)

    def _count(self, net, sp: int):
        def hook(module, args, kwargs):
            if not self._in_step:
                return
            x = args[0] if args else kwargs.get("x")
            ctx = kwargs.get("context", args[2] if len(args) > 2 else None)
            if x is None or x.ndim != 5:
                return
            pt, ph, pw = module.config.patch_size
            T = (x.shape[2] // pt) * (x.shape[3] // ph) * (x.shape[4] // pw)
            Lc = ctx.shape[1] if ctx is not None else 0
            trained = torch.is_grad_enabled() and any(p.requires_grad for p in module.parameters())
            fn = wan_train_flops if trained else wan_forward_flops
            self._flops += x.shape[0] * fn(module.config, T, Lc) / sp

        return net.register_forward_pre_hook(hook, with_kwargs=True)

    def on_train_start(self, trainer, pl_module):
        from turbo_train.parallel import wan_networks

        sp = getattr(trainer.strategy, "sequence_parallel", 1)
        self._hooks = [self._count(net, sp) for net in wan_networks(pl_module).values()]
        if pl_module.device.type == "cuda":
            self._peak = gpu_peak_tflops(torch.cuda.get_device_name(pl_module.device), self.precision,
                                         self.matmul_precision)
        self._sync(pl_module)
        self._t0, self._step0, self._samples, self._flops = time.perf_counter(), trainer.global_step, 0, 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._in_step = True

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._in_step = False
        x = batch.get("video", batch.get("latent")) if isinstance(batch, dict) else None
        dp = data_parallel_slot(trainer)[1]
        self._samples += (x.shape[0] if x is not None else 0) * dp
        steps = trainer.global_step - self._step0
        if steps < self.window:
            # log nothing between window ends: on a GPU each logged Python float is a host -> device copy that
            # waits for the queued kernels, and would keep the host from preparing the next batch meanwhile
            # (the logger shows a metric's last value until it changes)
            return
        self._sync(pl_module)
        now = time.perf_counter()
        dt = now - self._t0
        self.samples_per_s = self._samples / dt
        self.step_s = dt / steps
        self.tflops = self._flops / dt / 1e12
        self.mfu = self.tflops / self._peak if self._peak else None
        self._t0, self._step0, self._samples, self._flops = now, trainer.global_step, 0, 0.0
        pl_module.log("train/samples_per_s", self.samples_per_s, prog_bar=True)
        pl_module.log("train/step_s", self.step_s)
        pl_module.log("train/model_tflops_per_s", self.tflops)
        if self.mfu is not None:
            pl_module.log("train/mfu", self.mfu)
        if pl_module.device.type == "cuda":
            pl_module.log("train/peak_mem_gib", torch.cuda.max_memory_allocated(pl_module.device) / 2**30)
        else:  # ru_maxrss is in KiB on Linux
            pl_module.log("train/peak_rss_gib", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)

    def on_train_end(self, trainer, pl_module):
        for h in self._hooks:
            h.remove()
        self._hooks = []


class DataSkipMonitor(Callback):
    """Logs data/skipped_shards and data/skipped_samples (corrupted or truncated shards and undecodable
    samples the shard reader skipped, all workers) from a datamodule exposing those counters, at each
    logged step, and prints them at the end of training when any were skipped."""

    def _counts(self, trainer):
        dm = getattr(trainer, "datamodule", None)
        if dm is None or not hasattr(dm, "skipped_shards"):
            return None
        return dm.skipped_shards, dm.skipped_samples

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        c = self._counts(trainer)
        if c is not None:
            pl_module.log("data/skipped_shards", float(c[0]))
            pl_module.log("data/skipped_samples", float(c[1]))

    def on_train_end(self, trainer, pl_module):
        c = self._counts(trainer)
        if c is not None and (c[0] or c[1]):
            rank_zero_info(f"turbo-train: skipped {c[0]} corrupted shard(s) and {c[1]} bad sample(s) on rank 0")


# ----------------------------------------------------------------------------- progress lines


def _fmt_duration(seconds: float) -> str:
    seconds = int(max(0.0, seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class ProgressLines(Callback):
    """Rank 0 prints one line every `every` optimizer steps and at the last one: the step, the newest
    logged losses, gradient norms and learning rates, seconds per step over the window, elapsed time
    and an estimate of the time left (to max_steps, or to max_time when that comes first):

        turbo-train step 40/5000 | loss 0.0213 grad_norm 0.412 lr 0.0001 | 0.84 s/step | 0:00:34 elapsed, 1:09:26 left

    The values are read from trainer.callback_metrics at those steps only (one host copy per value)."""

    SHOWN = ("loss", "grad", "lr", "samples_per_s")  # metric names (after "train/") that the line shows

    def __init__(self, every: int, max_steps: int, max_time_s: float | None = None):
        self.every = max(1, int(every))
        self.max_steps, self.max_time_s = int(max_steps), max_time_s
        self._t_start = self._t_last = None
        self._step_last = 0
        self._printed = -1

    def on_train_start(self, trainer, pl_module):
        self._t_start = self._t_last = time.perf_counter()
        self._step_last = self._printed = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        if not trainer.is_global_zero or step == self._printed or (step % self.every and step < self.max_steps):
            return
        now = time.perf_counter()
        s_per_step = (now - self._t_last) / max(1, step - self._step_last)
        elapsed = now - self._t_start
        left = (self.max_steps - step) * s_per_step
        if self.max_time_s is not None:
            left = min(left, max(0.0, self.max_time_s - elapsed))
        shown = []
        for k, v in trainer.callback_metrics.items():
            name = k.removeprefix("train/")
            if k.startswith("train/") and name.startswith(self.SHOWN) and torch.is_tensor(v) and v.numel() == 1:
                shown.append(f"{name} {float(v):.4g}")
        line = (f"turbo-train step {step}/{self.max_steps} | {' '.join(shown) or 'no metrics yet'} | "
                f"{s_per_step:.3g} s/step | {_fmt_duration(elapsed)} elapsed, {_fmt_duration(left)} left")
        print(line, flush=True)
        self._t_last, self._step_last, self._printed = now, step, step


# ----------------------------------------------------------------------------- atomic checkpoints


class AtomicCheckpointIO(pl.plugins.TorchCheckpointIO):
    """torch.save to <dir>/.<name>.tmp-<pid>, fsync, then os.replace onto the checkpoint's name: a reader
    (or a resumed run) sees the old checkpoint or the new one, never a partial file. Directory
    checkpoints (FSDP2's sharded ones) are swapped in by `parallel.FSDP2Strategy`."""

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        if storage_options is not None:
            raise TypeError(f"AtomicCheckpointIO.save_checkpoint: storage_options are not supported, got {storage_options!r}")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            if tmp.exists():
                tmp.unlink()

