"""Step counters that are checkpointed but read on the host without a device sync.

A training module counts its updates (EMA updates, rCM's iterations, student and fake-score updates)
in long buffers, so that checkpoints save them and a resumed run restores them bitwise. Reading such a
buffer (`int(buf)`) on a GPU is a device -> host copy that stalls the host until every kernel queued so
far has run; done once or more per step, it keeps the GPU idle while Python prepares the next step.

`CountersMixin` keeps a host-side mirror of each counter: the buffer is read once (the first time it is
needed after construction, a state-dict load or the start of a fit) and from then on the mirror counts
and the buffer is bumped in place on the device (no sync)."""
from __future__ import annotations

import torch


class CountersMixin:
    """For LightningModules: `register_counters(names)` in __init__, then `count(name)` (int, no sync
    once mirrored) and `bump(name)` (adds 1 to buffer and mirror, returns the count before)."""

    _host_counts: dict[str, int]  # set by register_counters / forget_counts

    def register_counters(self, *names: str) -> None:
        for name in names:
            self.register_buffer(name, torch.zeros((), dtype=torch.long))
        self.forget_counts()

    def forget_counts(self) -> None:
        """Drop the host mirror: the next count() reads the buffers again."""
        self._host_counts = {}

    def count(self, name: str) -> int:
        if name not in self._host_counts:
            self._host_counts[name] = int(getattr(self, name).item())
        return self._host_counts[name]

    def bump(self, name: str) -> int:
        k = self.count(name)
        getattr(self, name).add_(1)
        self._host_counts[name] = k + 1
        return k

    def on_fit_start(self) -> None:
        self.forget_counts()  # the buffers may have been restored from a checkpoint since the last fit
        super().on_fit_start()

    def load_state_dict(self, *args, **kwargs):
        self.forget_counts()  # the counters come from the state dict
        return super().load_state_dict(*args, **kwargs)
