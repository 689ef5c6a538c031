"""Atomic publication of index files and directories.

A file is written beside its destination and renamed over it (`os.replace`). A directory is built under a
hidden temporary sibling and renamed into place; a previous version is first renamed aside and deleted
after the swap, so a reader sees the old complete directory or the new one (POSIX cannot rename over a
non-empty directory, so between the two renames the path is briefly absent, never partial).
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path


def fsync_path(path: Path) -> None:
    """fsync a file or a directory (making its renames durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_with(final_path: Path, write: Callable[[Path], None]) -> None:
    """Call `write(tmp_path)`, fsync, then rename over `final_path`; the temporary file is removed on error."""
    final_path = Path(final_path)
    final_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = final_path.parent / f".{final_path.name}.{uuid.uuid4().hex}.tmp"
    try:
        write(tmp)
        fsync_path(tmp)
        os.replace(tmp, final_path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_path(final_path.parent)


@contextmanager
def atomic_directory(final_dir: Path) -> Iterator[Path]:
    """Yield an empty temporary directory; when the block succeeds it replaces `final_dir` (else is removed)."""
    final_dir = Path(final_dir)
    final_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = final_dir.parent / f".{final_dir.name}.{uuid.uuid4().hex}.tmp"
    tmp.mkdir()
    try:
        yield tmp
        for file in tmp.rglob("*"):
            if file.is_file():
                fsync_path(file)
        fsync_path(tmp)
        _swap_into_place(tmp, final_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _swap_into_place(tmp: Path, final_dir: Path) -> None:
    if final_dir.exists():
        old = final_dir.parent / f".{final_dir.name}.{uuid.uuid4().hex}.old"
        os.replace(final_dir, old)
        os.replace(tmp, final_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final_dir)
    fsync_path(final_dir.parent)
