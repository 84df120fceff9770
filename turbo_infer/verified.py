"""A record of files whose sha256 was checked, so that a restart need not hash an unchanged file again.

Hashing a bundle is on the critical path of every start (1.4 GiB for the Wan-1.3B h100 bundle: 1.4-3 s
on an H200 host, BENCHMARKS.md "End to end"). Like git's index, this keeps, per file that matched its
expected sha256, the file's stat identity: device, inode, size, modification and status-change times in
nanoseconds. A later check of the same file against the same expected digest skips the hashing only if
all five are unchanged. Any write to the file moves its ctime, which user programs cannot set back
(`touch -d` sets mtime, not ctime), and a replaced file has a new inode; so a modified, truncated,
replaced or re-exported file is always hashed again. To keep a write that lands within the filesystem's
timestamp granularity of the hashing from hiding ("racy" entries, as git calls them), a file is only
recorded once its last change is RACY_S seconds old at the time it was hashed.

The record lives in $TURBO_CACHE_DIR (default $XDG_CACHE_HOME/turbo, else ~/.cache/turbo) as
verified_sha256.json, rewritten atomically; an unreadable or unwritable record only means hashing again.
`turbo-infer --verify full` / `from_bundle(verify="full")` ignore it.
"""
from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

RACY_S = 2.0
FILE = "verified_sha256.json"
log = logging.getLogger(__name__)


def cache_dir() -> Path:
    from turbo_infer.pycache import user_cache_dir

    if os.environ.get("TURBO_CACHE_DIR"):
        return Path(os.environ["TURBO_CACHE_DIR"])
    return user_cache_dir()


def file_state(path: Path) -> list[int]:
    """[device, inode, size, mtime_ns, ctime_ns] of `path` (follows symlinks)."""
    st = path.stat()
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


class VerifiedFiles:
    """The record, loaded once: `known(path, sha256)` says whether `path` was hashed to `sha256` in its
    current state; `add(path, sha256, state)` records a match (state: `file_state` taken before hashing);
    `save()` writes the record if anything was added."""

    def __init__(self, directory: Path | None = None):
        self.path = (directory or cache_dir()) / FILE
        self.entries: dict = {}
        self.dirty = False
        try:
            data = json.loads(self.path.read_text())
            if isinstance(data, dict):
                self.entries = data
        except (OSError, ValueError):
            pass  # none yet, or unreadable: everything is hashed

    def known(self, path: Path, sha256: str) -> bool:
        entry = self.entries.get(str(Path(path).resolve()))
        try:
            return isinstance(entry, dict) and entry.get("sha256") == sha256 and entry.get("state") == file_state(path)
        except OSError:
            return False

    def add(self, path: Path, sha256: str, state: list[int]) -> None:
        """Record `path` as hashed to `sha256` in `state`, unless it changed since (then the hash may be of
        a mix of old and new bytes) or changed less than RACY_S seconds before the hashing began."""
        try:
            if file_state(path) != state:
                return
        except OSError:
            return
        if time.time_ns() - max(state[3], state[4]) < RACY_S * 1e9:
            return
        self.entries[str(Path(path).resolve())] = {"sha256": sha256, "state": state}
        self.dirty = True

    def save(self) -> None:
        """Write the record (atomically) if anything was added, without the entries of files that are gone."""
        if not self.dirty:
            return
        self.entries = {k: v for k, v in self.entries.items() if os.path.exists(k)}
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps(self.entries, indent=0) + "\n")
            os.replace(tmp, self.path)
            self.dirty = False
        except OSError as e:
            log.info("could not write %s (%s): the next start hashes again", self.path, e)
            tmp.unlink(missing_ok=True)


__all__ = ["FILE", "RACY_S", "VerifiedFiles", "cache_dir", "file_state"]
