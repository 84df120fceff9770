"""Triton's per-process compiler key, computed early in a background thread.

The first Triton kernel a process launches pays, even when its compiled binary is in Triton's on-disk cache, for
the cache key's `triton_key()`: a SHA-256 of Triton's compiler sources and of its whole libtriton shared library
(~500 MB in Triton 3.9), computed once per process (0.35 s on this project's 2-core CPU machine; the ~0.47 s first
launch of `_quantize_rows_kernel` in the Wan-1.3B time to first video on an H100, BENCHMARKS.md "End to end"). File
reads and hashlib's large-buffer updates release the GIL, so the key can be computed in a thread while a program
loads weights; the first launch then finds it cached (`functools.lru_cache`).
"""
from __future__ import annotations

import importlib
import os
import threading
import time

# where Triton keeps the function, by version (3.9: runtime.cache; earlier 3.x: compiler.compiler)
_LOCATIONS = (("triton.runtime.cache", "triton_key"), ("triton.compiler.compiler", "triton_key"))


def early_key_enabled() -> bool:
    """False when $TURBO_TRITON_KEY is 0/off/no/false (to time a program without the early key)."""
    return os.environ.get("TURBO_TRITON_KEY", "").strip().lower() not in ("0", "off", "no", "false")


def find_triton_key():
    """Triton's `triton_key` function, or None where Triton is missing or keeps it elsewhere."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return None
    for module, name in _LOCATIONS:
        try:
            fn = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError):
            continue
        if callable(fn):
            return fn
    return None


class TritonKeyWarmup:
    """`triton_key()` in a daemon thread from construction; `wait()` joins it and returns its seconds (None if
    there was nothing to compute). Failures are swallowed: the first launch then computes the key itself."""

    def __init__(self):
        self.seconds: float | None = None
        self.error: BaseException | None = None
        fn = find_triton_key()
        self._thread = None
        if fn is not None:
            self._thread = threading.Thread(target=self._run, args=(fn,), name="triton key", daemon=True)
            self._thread.start()

    def _run(self, fn) -> None:
        t = time.perf_counter()
        try:
            fn()
        except BaseException as e:  # noqa: BLE001  an optimisation only
            self.error = e
        self.seconds = time.perf_counter() - t

    @property
    def started(self) -> bool:
        return self._thread is not None

    def wait(self, timeout: float = 30.0) -> float | None:
        if self._thread is not None:
            self._thread.join(timeout)
        return self.seconds


__all__ = ["TritonKeyWarmup", "early_key_enabled", "find_triton_key"]
