"""Publishing written files: the last step of every atomic write of weights (temporary file, then rename)."""
from __future__ import annotations

import os
from pathlib import Path


def publish_file(tmp: str | os.PathLike, path: str | os.PathLike) -> Path:
    """Give the finished temporary file `tmp` the permissions a new file gets under this process's umask
    (safetensors creates its files owner-only, 0600, which other users of a shared cluster could not
    read) and rename it onto `path` atomically: a reader sees the old file or the whole new one."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    os.replace(tmp, path)
    return Path(path)


def copy_file(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Copy `src` to `dst` atomically (temporary file beside dst, then publish_file)."""
    import shutil

    dst = Path(dst)
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.copyfile(src, tmp)
    return publish_file(tmp, dst)


def write_json(path: str | os.PathLike, doc) -> Path:
    """Write `doc` as indented JSON to `path` atomically (temporary file beside it, then publish_file),
    creating the parent folder."""
    import json

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    return publish_file(tmp, path)
