"""tools/bench_harness.py: the one benchmarks/<tool>.json document every benchmark and evaluation tool writes."""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))

import bench_harness  # noqa: E402


def test_document_fields_and_defaults(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["tools/bench_x.py", "--tiny"])
    doc = bench_harness.benchmark_doc({"a": 1.5}, notes={"why": "test"})
    assert list(doc)[:4] == ["device", "date", "command", "figures"] and doc["notes"] == {"why": "test"}
    assert doc["command"] == "python tools/bench_x.py --tiny" and doc["figures"] == {"a": 1.5}
    assert doc["date"].endswith("Z") and doc["date"][:4].isdigit()
    assert bench_harness.device_label("cpu").startswith("CPU (")
    given = bench_harness.benchmark_doc({}, device="NVIDIA H200", command="python tools/y.py")
    assert (given["device"], given["command"]) == ("NVIDIA H200", "python tools/y.py")


def test_harness_write_goes_to_every_dir_with_extra_fields(tmp_path, monkeypatch):
    out = tmp_path / "device_out"
    monkeypatch.setenv("OUT", str(out))
    h = bench_harness.Harness("unit")
    h.figure("unit_speedup", 2.0)
    paths = h.write(tmp_path / "bench", notes={"k": "v"})
    assert paths == [tmp_path / "bench" / "unit.json", out / "unit.json"]
    for p in paths:
        doc = json.loads(p.read_text())
        assert doc["figures"] == {"unit_speedup": 2.0} and doc["notes"] == {"k": "v"}
    assert not list((tmp_path / "bench").glob("*.tmp*"))  # written atomically: no temporary left behind
