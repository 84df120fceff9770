"""A prepared Python bytecode cache for the runtime's imports (`turbo-infer --prepare`).

Python compiles every imported source file to bytecode and normally keeps the result in `__pycache__`
beside the source. An environment that sets PYTHONDONTWRITEBYTECODE=1 over a package installed without
its bytecode (the GPU image our figures are measured on ships torch that way) recompiles all of torch's
Python at every start: `import torch` took 4.4-5.1 s there against 1.9-2.4 s with bytecode, about a fifth
of the Wan-1.3B time to first video (BENCHMARKS.md, "End to end").

`prepare()` compiles the source files of the packages the runtime imports into a cache directory of
its own (`cache_dir()`: $TURBO_PYCACHE_DIR, else $XDG_CACHE_HOME/turbo/pycache, else
~/.cache/turbo/pycache) and writes a marker there. `activate()` — called when `turbo_infer` is imported,
before the runtime imports torch — points `sys.pycache_prefix` at that directory when the marker exists,
so later imports read the prepared bytecode. It changes nothing unless `prepare()` has run, when the
user already set a prefix (PYTHONPYCACHEPREFIX / -X pycache_prefix) or when TURBO_PYCACHE=0. A cached
file is used only while its source's size and mtime match (Python's own check); a stale or missing
entry falls back to compiling the source, as without the cache. Only imports after `activate()` gain:
a program that imports torch before turbo_infer keeps its own bytecode behaviour for torch.

Only the standard library is imported here (this runs before torch), and at import only os, sys and
pathlib: the rest waits for prepare().
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

MARKER = "turbo-pycache.json"
# what a runtime process imports: the runtime's own modules plus those a bundle load and a generation
# pull in; prepare() compiles every package these bring into sys.modules
RUNTIME_IMPORTS = ("turbo_kernels", "turbo_infer.pipeline", "turbo_infer.bundle", "turbo_infer.cli",
                   "turbo_infer.prewarm", "turbo_infer.video_io")
OPTIONAL_IMPORTS = ("triton", "triton.compiler", "triton.runtime", "tokenizers", "imageio_ffmpeg")


def user_cache_dir() -> Path:
    """The user's cache directory for turbo: $XDG_CACHE_HOME/turbo, else ~/.cache/turbo (the default home of
    this cache and of turbo_infer.verified's record)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "turbo"


def cache_dir() -> Path:
    """Where the prepared bytecode lives (module docstring)."""
    if os.environ.get("TURBO_PYCACHE_DIR"):
        return Path(os.environ["TURBO_PYCACHE_DIR"]).expanduser()
    return user_cache_dir() / "pycache"


def disabled() -> bool:
    return os.environ.get("TURBO_PYCACHE", "").strip().lower() in ("0", "off", "no", "false")


def activate() -> bool:
    """Point sys.pycache_prefix at the prepared cache when there is one (module docstring); returns whether
    it did."""
    if disabled() or sys.pycache_prefix is not None:
        return False
    try:
        d = cache_dir()
        if not (d / MARKER).is_file():
            return False
    except (OSError, RuntimeError):  # no home directory, unreadable cache: run as without it
        return False
    sys.pycache_prefix = str(d)
    return True


def _package_roots(imports: tuple[str, ...], optional: tuple[str, ...]) -> list[str]:
    """Directories (packages) and files (single-module imports) holding the source of every module that
    importing `imports` (and, where installed, `optional`) loads, found in a child interpreter so that
    this process's own modules do not count. The standard library is included: an image may lack its
    bytecode too."""
    import json
    import subprocess

    code = (
        "import importlib, json, sys\n"
        f"for name in {list(imports)!r}: importlib.import_module(name)\n"
        f"for name in {list(optional)!r}:\n"
        "    try: importlib.import_module(name)\n"
        "    except Exception: pass\n"
        "roots = set()\n"
        "for name, mod in list(sys.modules.items()):\n"
        "    f = getattr(mod, '__file__', None)\n"
        "    if not f or not f.endswith('.py'): continue\n"
        "    top = sys.modules.get(name.partition('.')[0])\n"
        "    tf = getattr(top, '__file__', None)\n"
        "    if tf and tf.endswith('__init__.py'): roots.add(tf[:-len('__init__.py')].rstrip('/\\\\'))\n"
        "    elif tf and tf.endswith('.py'): roots.add(tf)\n"
        "    else: roots.add(f)\n"
        "print(json.dumps(sorted(roots)))\n"
    )
    env = dict(os.environ, TURBO_PYCACHE="0")  # the child must not read a half-written cache
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"could not import the runtime to find its modules:\n{out.stderr.strip()[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def prepare(directory: Path | None = None, imports: tuple[str, ...] = RUNTIME_IMPORTS,
            optional: tuple[str, ...] = OPTIONAL_IMPORTS, workers: int = 0, stdlib: bool = True) -> dict:
    """Compile the bytecode of every package the runtime imports into `directory` (default `cache_dir()`)
    and write the marker that makes `activate()` use it. Safe to re-run (files already current are kept);
    the marker is written last, so an interrupted run leaves no active half cache. Returns a summary:
    directory, roots, files, seconds. stdlib=False leaves the standard library out (tests only: without
    it, an activated cache compiles the standard library's modules at every start)."""
    import json
    import subprocess
    import time

    t = time.perf_counter()
    d = Path(directory) if directory is not None else cache_dir()
    try:
        d.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise RuntimeError(f"cannot create the bytecode cache directory {d}: {err} (set TURBO_PYCACHE_DIR)") from err
    roots = _package_roots(tuple(imports), tuple(optional))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env.update(PYTHONPYCACHEPREFIX=str(d), TURBO_PYCACHE="0")
    # Once the prefix is set, Python looks for bytecode there only, so a module missing from the cache
    # would compile at every start even where its installation has bytecode beside it: the whole
    # standard library goes in (lazy imports included; site-packages inside it left to the roots), and
    # each root package whole, not only the modules the probe imported.
    import sysconfig

    lib = sysconfig.get_paths()["stdlib"]
    # -q: errors only; -j: processes (0 = all cores); -x: paths to skip (test suites: never imported by
    # the runtime, and some wheels ship test data as .py that does not compile)
    runs = [([lib] if stdlib else [], r"[/\\](site-packages|dist-packages|tests?|idlelib|lib2to3|turtledemo)[/\\]"),
            ([r for r in roots if not r.startswith(lib + os.sep) or "-packages" in r], r"[/\\]tests?[/\\]")]
    for paths, skip in runs:
        if not paths:
            continue
        cmd = [sys.executable, "-m", "compileall", "-q", "-j", str(workers), "-x", skip, *paths]
        out = subprocess.run(cmd, env=env, capture_output=True, text=True)
        # compileall exits 1 when a file fails to compile (e.g. a template shipped as .py): the others are
        # written, so that is not fatal; anything else is
        if out.returncode not in (0, 1):
            raise RuntimeError(f"compileall failed ({out.returncode}):\n{(out.stdout + out.stderr).strip()[-2000:]}")
    files = sum(1 for _ in d.rglob("*.pyc"))
    summary = {"directory": str(d), "python": sys.version.split()[0], "executable": sys.executable,
               "roots": roots, "files": files, "seconds": round(time.perf_counter() - t, 2)}
    tmp = d / (MARKER + ".tmp")
    tmp.write_text(json.dumps(summary, indent=1))
    os.replace(tmp, d / MARKER)
    return summary


__all__ = ["MARKER", "RUNTIME_IMPORTS", "activate", "cache_dir", "prepare"]
