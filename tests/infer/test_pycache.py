"""turbo_infer.pycache: `turbo-infer --prepare`'s bytecode cache, read by a fresh process that imports
turbo_infer even under PYTHONDONTWRITEBYTECODE=1.

How a test can tell the cache was read: Python accepts a cached .pyc while its source's size and mtime
match the ones recorded in it. After prepare(), the source is rewritten to a different value of the same
length and its mtime put back, so a process that reads the prepared bytecode sees the old value and one
that compiles the source sees the new one."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from turbo_infer import pycache


def _package(root: Path, value: int) -> Path:
    pkg = root / "tinypkg"
    pkg.mkdir(parents=True, exist_ok=True)
    (pkg / "__init__.py").write_text(f"VALUE = {value}\n")
    return pkg / "__init__.py"


def _env(tmp_path: Path, cache: Path, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPYCACHEPREFIX", "TURBO_PYCACHE")}
    env.update(PYTHONPATH=os.pathsep.join([str(tmp_path / "src"), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
               TURBO_PYCACHE_DIR=str(cache), PYTHONDONTWRITEBYTECODE="1", **extra)
    return env


def _value(env: dict) -> str:
    code = "import turbo_infer, sys, tinypkg; print(tinypkg.VALUE, sys.pycache_prefix)"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.strip()


def test_prepared_bytecode_is_read_by_a_fresh_process(tmp_path, monkeypatch):
    src = _package(tmp_path / "src", 1)
    cache = tmp_path / "cache"
    monkeypatch.setenv("PYTHONPATH", str(tmp_path / "src"))
    summary = pycache.prepare(cache, imports=("tinypkg",), optional=("no_such_module_here",), stdlib=False)
    assert (cache / pycache.MARKER).is_file()
    assert str(src.parent) in summary["roots"]
    assert summary["files"] >= 1
    assert not (src.parent / "__pycache__").exists()  # nothing written beside the source
    stat = src.stat()
    src.write_text("VALUE = 2\n")  # same length ...
    os.utime(src, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # ... and mtime: the cached pyc still validates
    assert _value(_env(tmp_path, cache)) == f"1 {cache}"  # read from the prepared cache
    assert _value(_env(tmp_path, cache, TURBO_PYCACHE="0")) == "2 None"  # opted out: compiled from source
    (cache / pycache.MARKER).unlink()
    assert _value(_env(tmp_path, cache)) == "2 None"  # no marker, no cache


def test_activate_only_with_a_marker_and_no_prefix_of_the_users(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "pycache_prefix", None)
    monkeypatch.setenv("TURBO_PYCACHE_DIR", str(tmp_path))
    monkeypatch.delenv("TURBO_PYCACHE", raising=False)
    assert pycache.activate() is False and sys.pycache_prefix is None
    (tmp_path / pycache.MARKER).write_text("{}")
    monkeypatch.setenv("TURBO_PYCACHE", "off")
    assert pycache.activate() is False and sys.pycache_prefix is None
    monkeypatch.delenv("TURBO_PYCACHE")
    monkeypatch.setattr(sys, "pycache_prefix", "/somewhere/of/the/users")
    assert pycache.activate() is False and sys.pycache_prefix == "/somewhere/of/the/users"
    monkeypatch.setattr(sys, "pycache_prefix", None)
    assert pycache.activate() is True and sys.pycache_prefix == str(tmp_path)


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("TURBO_PYCACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert pycache.cache_dir() == tmp_path / "turbo" / "pycache"
    monkeypatch.setenv("TURBO_PYCACHE_DIR", str(tmp_path / "x"))
    assert pycache.cache_dir() == tmp_path / "x"


def test_prepare_errors_name_the_problem(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(RuntimeError, match="cannot create the bytecode cache directory .*file"):
        pycache.prepare(blocker / "cache", imports=("json",), optional=(), stdlib=False)
    with pytest.raises(RuntimeError, match="no_such_module_xyz"):
        pycache.prepare(tmp_path / "cache", imports=("no_such_module_xyz",), optional=(), stdlib=False)
    assert not (tmp_path / "cache" / pycache.MARKER).exists()  # a failed prepare activates nothing
