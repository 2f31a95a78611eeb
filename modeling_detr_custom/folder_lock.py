"""One tool at a time in an output folder: `hold_folder` takes an exclusive lock on a file inside it.

The lock is ``fcntl.flock`` on ``<folder>/.detr_custom.lock``, non-blocking: a second run into a held folder is
refused at once with one line naming the holder (its tool, pid and start time, which the holder writes into the
file). The kernel drops a flock when its process dies, so a run killed with SIGKILL never leaves the folder stuck;
its lock file stays behind, unlocked, and the next holder takes it over. The holder deletes the file on release.

Standard library only (no torch): a test or another tool can load this file alone.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

logger = logging.getLogger(__name__)

LOCK_FILE = ".detr_custom.lock"
# A file system (or platform) without flock: the folder is used unprotected, with a warning, rather than refused.
NO_LOCKS = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS)
# The environment variables that give a process's global rank under torchrun / accelerate launch / MPI, as
# accelerate's own PartialState reads them: only rank 0 (accelerate's main process) takes the lock.
RANK_VARIABLES = ("RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK", "PMI_RANK")


def is_main_rank() -> bool:
    """True unless a launcher says this process has a global rank other than 0."""
    for name in RANK_VARIABLES:
        value = os.environ.get(name, "").strip()
        if value.isdigit():
            return int(value) == 0
    return True


@contextmanager
def hold_folder(folder: str | os.PathLike, tool: str, option: str = "--output_dir",
                enabled: bool = True) -> Iterator[Path]:
    """Hold ``folder`` (which must exist) for ``tool`` while the block runs.

    Raises ValueError in one line when another process holds it (naming that process) or when the lock file
    cannot be created in it. ``option`` names the command-line option of the folder, for the message.
    ``enabled=False`` holds nothing: the non-main processes of a multi-process run (their main process holds it).
    """
    folder = Path(folder)
    if not enabled:
        yield folder
        return
    path = folder / LOCK_FILE
    fd = _acquire(path, folder, option)
    if fd is None:
        yield folder
        return
    try:
        record = {"tool": tool, "pid": os.getpid(), "host": socket.gethostname(),
                  "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(record).encode())
        yield folder
    finally:
        # unlinked while still locked: a process that opened the old file sees it is gone and opens a new one
        try:
            path.unlink()
        except OSError:
            pass
        os.close(fd)


def _acquire(path: Path, folder: Path, option: str) -> int | None:
    """An open descriptor of ``path`` holding its exclusive flock; ValueError when someone else holds it; None (and
    a warning) where locks do not exist."""
    try:
        import fcntl
    except ImportError:  # not a POSIX system
        logger.warning("%s %s is not locked (no fcntl here): nothing stops a second run into it", option, folder)
        return None
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)  # the umask applies, as for any file
        except OSError as err:
            raise ValueError(f"{option} {folder} cannot be used: its lock file {path} cannot be created "
                             f"({err.strerror or err})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            holder = _holder(fd)
            os.close(fd)
            if err.errno in NO_LOCKS:
                logger.warning("%s %s cannot be locked (%s): nothing stops a second run into it", option, folder,
                               err.strerror or err)
                return None
            if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise ValueError(f"{option} {folder} cannot be locked ({err.strerror or err})") from None
            raise ValueError(f"{folder} is in use by {holder}; wait for it to finish or choose another "
                             f"{option}") from None
        if _same_file(fd, path):
            return fd
        os.close(fd)  # the previous holder deleted this file as we opened it: lock the new one


def _same_file(fd: int, path: Path) -> bool:
    try:
        here, there = os.fstat(fd), os.stat(path)
    except FileNotFoundError:
        return False
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)


def _holder(fd: int) -> str:
    """'train.py (pid 1234, since 2026-12-07 15:02:11)' from the lock file, or a vaguer description."""
    try:
        record = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (OSError, ValueError):
        record = {}
    if not isinstance(record, dict) or "pid" not in record:
        return "another process (it is starting or did not say who it is)"
    where = "" if record.get("host") in (None, socket.gethostname()) else f" on {record['host']}"
    return f"{record.get('tool', 'another tool')} (pid {record['pid']}{where}, since {record.get('since', '?')})"


__all__ = ["LOCK_FILE", "hold_folder", "is_main_rank"]
