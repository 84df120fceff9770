"""turbo_kernels.triton_key: Triton's per-process compiler key computed in a background thread."""
import sys

import pytest

from turbo_kernels import triton_key as TK


def test_the_warmup_computes_and_caches_the_key():
    pytest.importorskip("triton")
    fn = TK.find_triton_key()
    assert callable(fn) and hasattr(fn, "cache_info"), "triton_key is expected to be an lru_cache'd function"
    w = TK.TritonKeyWarmup()
    assert w.started
    seconds = w.wait()
    assert seconds is not None and seconds >= 0 and w.error is None
    assert fn.cache_info().currsize >= 1  # the first kernel launch now finds it cached
    assert fn() == fn()


def test_without_triton_nothing_starts(monkeypatch):
    monkeypatch.setitem(sys.modules, "triton", None)  # `import triton` raises ImportError
    assert TK.find_triton_key() is None
    w = TK.TritonKeyWarmup()
    assert not w.started and w.wait() is None


def test_a_failing_key_is_swallowed(monkeypatch):
    def broken():
        raise OSError("libtriton.so: no such file")

    monkeypatch.setattr(TK, "find_triton_key", lambda: broken)
    w = TK.TritonKeyWarmup()
    assert w.started
    assert w.wait() is not None  # it finished, and only recorded the failure
    assert isinstance(w.error, OSError)


@pytest.mark.parametrize("value,enabled", [(None, True), ("1", True), ("0", False), ("off", False), (" False ", False)])
def test_the_early_key_can_be_turned_off(monkeypatch, value, enabled):
    if value is None:
        monkeypatch.delenv("TURBO_TRITON_KEY", raising=False)
    else:
        monkeypatch.setenv("TURBO_TRITON_KEY", value)
    assert TK.early_key_enabled() is enabled
