"""CountersMixin: checkpointed step counters read on the host once, then mirrored (no device sync)."""
from __future__ import annotations

import torch

from turbo_train.lightning_compat import LightningModule
from turbo_train.methods.counters import CountersMixin


class Counted(CountersMixin, LightningModule):
    def __init__(self):
        super().__init__()
        self.register_counters("steps", "updates")


def test_bump_counts_on_host_and_device(monkeypatch):
    m = Counted()
    reads = []
    item = torch.Tensor.item
    monkeypatch.setattr(torch.Tensor, "item", lambda t: (reads.append(1), item(t))[1])
    assert [m.bump("steps") for _ in range(3)] == [0, 1, 2]
    assert m.count("steps") == 3 and m.count("updates") == 0
    assert len(reads) == 2  # one read per counter, then the mirror counts
    monkeypatch.undo()
    assert int(m.steps) == 3 and int(m.updates) == 0  # the buffers were bumped too
    assert set(m.state_dict()) == {"steps", "updates"}


def test_state_dict_load_and_fit_start_reread_the_buffers():
    m = Counted()
    m.bump("steps")
    state = m.state_dict()
    state["steps"] = torch.tensor(41)
    m.load_state_dict(state)  # a resumed run: the next count comes from the checkpoint
    assert m.bump("steps") == 41 and int(m.steps) == 42
    m.steps.fill_(7)  # changed behind the mirror (a strategy that restores buffers in place)
    assert m.count("steps") == 42
    m.on_fit_start()
    assert m.count("steps") == 7
