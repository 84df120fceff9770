"""tools/gpu_batch.py: jobs in order under one deadline, logs and collected paths packed into one file."""
from __future__ import annotations

import json
import sys
import tarfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))

import gpu_batch  # noqa: E402


def members(tgz: Path) -> dict[str, bytes]:
    with tarfile.open(tgz) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}


def test_jobs_run_in_order_and_everything_comes_back_as_one_file(tmp_path):
    out = tmp_path / "out"
    rc = gpu_batch.main(["--out", str(out), "--deadline-s", "12", "--reserve-s", "5", "--min-job-s", "1",
                         "--run", "ok=echo hello", "--run", "bad=echo oops; exit 7",
                         "--run", "slow=sleep 30", "--collect", "pyproject.toml", "--collect", "no/such/file"])
    assert rc == 1
    assert [p.name for p in out.iterdir()] == ["batch.tgz"]  # one file for the device's return
    files = members(out / "batch.tgz")
    jobs = {j["job"]: j for j in json.loads(files["batch/batch.json"])["jobs"]}
    assert jobs["ok"]["rc"] == 0 and files["batch/logs/ok.log"] == b"hello\n"
    assert jobs["bad"]["rc"] == 7 and b"oops" in files["batch/logs/bad.log"]
    assert jobs["slow"]["timed_out"] and jobs["slow"]["seconds"] < 12  # stopped at the deadline
    assert "collected/pyproject.toml" in files


def test_a_job_with_too_little_time_left_is_skipped(tmp_path):
    rc = gpu_batch.main(["--out", str(tmp_path), "--deadline-s", "40", "--reserve-s", "5", "--min-job-s", "30",
                         "--run", "first=sleep 6", "--run", "second=echo never"])
    files = members(tmp_path / "batch.tgz")
    jobs = {j["job"]: j for j in json.loads(files["batch/batch.json"])["jobs"]}
    assert rc == 1 and jobs["first"]["rc"] == 0 and jobs["second"]["skipped"]
    assert "batch/logs/second.log" not in files


def test_missing_modules_stop_before_any_job(tmp_path, capsys):
    assert gpu_batch.main(["--out", str(tmp_path), "--need", "json,no_such_module_xyz",
                           "--run", f"a=touch {tmp_path / 'ran'}"]) == 3
    assert "no_such_module_xyz" in capsys.readouterr().out
    assert not (tmp_path / "batch.tgz").exists() and not (tmp_path / "ran").exists()


@pytest.mark.parametrize("argv,msg", [
    (["--run", "a=true"], "--out"),
    (["--out", "X"], "no jobs"),
    (["--out", "X", "--run", "a=true", "--run", "a=false"], "unique"),
    (["--out", "X", "--run", "bad name=true"], "NAME=COMMAND"),
])
def test_arguments_are_checked(argv, msg, capsys, monkeypatch):
    monkeypatch.delenv("OUT", raising=False)
    with pytest.raises(SystemExit):
        gpu_batch.main(argv)
    assert msg in capsys.readouterr().err
