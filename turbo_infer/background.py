"""A component built in a background thread while the caller goes on.

`TurboPipeline.from_bundle(..., background=True)` starts loading the text encoder and the VAE this way,
then loads (and the caller may compile and warm up) the DiT in the main thread: at the Wan-1.3B shape the
umT5 encoder alone is 10.6 GiB to read, as long as everything else before the first video together. The
loads are mostly file reads and host-to-device copies, which release the GIL.

    enc = Background("text encoder", lambda: UMT5TextEncoder(path, device="cuda"), dim=4096)
    enc.dim            # 4096 at once: a promised attribute, checked against the real one on arrival
    enc.encode([...])  # waits for the load, then calls the real encoder

A load that failed raises its own exception (its type and message, e.g. the missing file) at the first
use that needs the object.
"""
from __future__ import annotations

import threading
import time


class Background:
    """`factory()` run in a daemon thread; any other attribute access waits for it and delegates.

    what: a name for messages ("text encoder"). known: attributes always answered from here, without
    waiting (e.g. a dimension the caller checks up front); result() raises if the built object's differ."""

    def __init__(self, what: str, factory, **known):
        self._what = what
        self._known = known
        self._value = None
        self._error: BaseException | None = None
        self.seconds: float | None = None  # how long factory() ran, once it has finished
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(factory,), name=f"load {what}", daemon=True)
        self._thread.start()

    def _run(self, factory) -> None:
        t = time.perf_counter()
        try:
            self._value = factory()
        except BaseException as e:  # re-raised in the thread that uses the component
            self._error = e
        finally:
            self.seconds = time.perf_counter() - t
            self._done.set()

    @property
    def ready(self) -> bool:
        """Whether the load has finished (successfully or not)."""
        return self._done.is_set()

    def result(self):
        """The built object (waits for it); re-raises the load's exception."""
        self._done.wait()
        if self._error is not None:
            raise self._error
        for name, promised in self._known.items():
            actual = getattr(self._value, name)
            if actual != promised:
                raise ValueError(f"the {self._what}'s {name} is {actual!r}, but {promised!r} was promised "
                                 f"(and checked against) when it started loading")
        return self._value

    def __getattr__(self, name: str):
        # only reached for attributes this proxy does not have itself
        if name.startswith("_"):
            raise AttributeError(name)
        if name in self._known:  # promised: never waits (result() checks it against the real one)
            return self._known[name]
        return getattr(self.result(), name)

    def __repr__(self) -> str:
        state = "loaded" if self.ready and self._error is None else "failed" if self.ready else "loading"
        return f"Background({self._what!r}, {state})"

