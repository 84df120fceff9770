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
