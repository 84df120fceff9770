"""tools/bench_triton_key.py: its fresh-process child runs (on the CPU through the Triton interpreter)."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))
import bench_triton_key as B  # noqa: E402


@pytest.mark.parametrize("mode", ["cold", "early"])
def test_child_launches_its_kernel(monkeypatch, mode):
    # the first GPU run failed here: `python -c` gives @triton.jit no source file to read
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    out = B.child(mode, device="cpu")
    assert out["first_launch_s"] >= 0
    if mode == "early":
        assert out["key_s"] is not None and out["key_s"] > 0


def test_a_failing_child_names_its_mode(monkeypatch):
    monkeypatch.setattr(B, "CHILD", "raise SystemExit(3)\n")
    with pytest.raises(SystemExit, match=r"child \(cold\) failed, exit 3"):
        B.child("cold", device="cpu")
