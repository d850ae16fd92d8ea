"""One process per run folder: an exclusive, non-blocking ``flock`` on ``RUN_DIR/.lock``.

Two ``asap train`` processes in one folder (two ``--resume`` started together,
or a new run pointed at a folder that is being trained) would interleave their
checkpoints and append to ``metrics.jsonl`` twice. The second one is refused
at once with :class:`RunLockedError`. The kernel releases the lock when its
holder exits, however it exits (even SIGKILL), so a stale ``.lock`` file never
blocks anyone: the file is only the thing locked, not the lock.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from asap.train.layout import LOCK_FILE, CheckpointError


class RunLockedError(CheckpointError):
    """The run folder is in use by another process."""


class RunLock:
    """Hold ``RUN_DIR/.lock`` exclusively until :meth:`release` (or the process exits).

    ``created`` tells whether this lock created the ``.lock`` file (so that a
    refused set-up can remove what it wrote).
    """

    def __init__(self, run_dir: str | os.PathLike):
        self.path = Path(run_dir) / LOCK_FILE
        try:
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
            self.created = True
        except FileExistsError:
            self.fd = os.open(self.path, os.O_RDWR | os.O_CLOEXEC)
            self.created = False
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            self.fd = -1
            raise RunLockedError(
                f"{Path(run_dir)} is in use by another asap process (it holds {self.path}); "
                "wait for it to finish, or choose another output directory"
            ) from None

    def release(self, *, remove: bool = False) -> None:
        """Unlock; with ``remove``, delete the ``.lock`` file first (only if this lock created it)."""
        if self.fd < 0:
            return
        if remove and self.created:
            self.path.unlink(missing_ok=True)
        os.close(self.fd)  # closing the descriptor releases the flock
        self.fd = -1
