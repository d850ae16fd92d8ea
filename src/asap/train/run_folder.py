"""The run folder of one training run: checked, created and locked before anything is written.

:class:`RunFolder` is opened once per run (by :func:`asap.train.train`, or by a
:class:`~asap.train.trainer.Trainer` given objects) and held until the run ends:

* a new run refuses a folder that already holds one; ``resume`` refuses a folder
  that holds none, and starts at step 0 when the run stopped before its first
  checkpoint (``config.json`` but no ``checkpoint.safetensors``);
* one process per folder (:class:`~asap.train.lock.RunLock`);
* a set-up that fails (:meth:`RunFolder.setting_up`) before the run's
  ``config.json`` was written leaves the folder as it found it: a folder it
  created is removed, files it added (a tokenizer, the lock) are deleted.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from asap.train.layout import CHECKPOINT_FILE, CONFIG_FILE, LOCK_FILE, CheckpointError
from asap.train.distributed import DistInfo, barrier
from asap.train.lock import RunLock


class RunFolder:
    """``path``, checked for a new run or for ``resume`` (every rank), created and locked (rank 0).

    ``fresh_start`` is True when the run starts at step 0 (a new run, or a resumed one without a checkpoint).
    Refusals raise :class:`CheckpointError` (or :class:`~asap.train.lock.RunLockedError`) and write nothing.
    """

    def __init__(self, path: str | os.PathLike, *, resume: bool, dist: DistInfo):
        self.path, self.dist, self.resume = Path(path), dist, resume
        self.checkpoint_path = self.path / CHECKPOINT_FILE
        self.fresh_start = self._check()  # before anything is created: a refusal writes nothing
        barrier(dist)  # every process has checked before rank 0 writes anything
        self.lock: RunLock | None = None
        #: True once this process has written the run's config.json (the run then exists and is kept).
        self.config_written = False
        self._created: Path | None = None
        self._entries_before: set[str] = set()
        if dist.is_main:
            self._created = self._make()
            self._entries_before = set(os.listdir(self.path))
            try:
                self.lock = RunLock(self.path)
                self._check()  # again, now that no other process can change the folder
            except BaseException:
                self.undo()
                raise
        if resume and self.fresh_start and dist.is_main:
            print(f"{self.path} holds no checkpoint yet (the run stopped before its first one): starting at step 0", flush=True)

    def _check(self) -> bool:
        """Refuse a folder that cannot be used; True when the run starts at step 0 (no checkpoint yet)."""
        has_config = (self.path / CONFIG_FILE).exists()
        has_checkpoint = self.checkpoint_path.exists()
        if self.resume:
            if not self.path.is_dir():
                raise CheckpointError(f"{self.path}: no such run directory; nothing to resume")
            if not has_config:
                raise CheckpointError(
                    f"{self.path / CONFIG_FILE}: file not found; {self.path} holds no run to resume "
                    "(start a new one with --out)"
                )
            return not has_checkpoint
        if self.path.exists() and not self.path.is_dir():
            raise CheckpointError(f"{self.path}: exists and is not a directory; choose another output directory")
        if has_checkpoint:
            raise CheckpointError(
                f"{self.path} already holds a run; continue it with --resume {self.path}, "
                "or choose another output directory"
            )
        if has_config:
            raise CheckpointError(
                f"{self.path} holds a run that stopped before its first checkpoint; start it again from step 0 "
                f"with --resume {self.path}, or delete the folder, or choose another output directory"
            )
        return True

    def _make(self) -> Path | None:
        """Create the folder; return the outermost folder this created (None if it existed)."""
        top = None
        for folder in (self.path, *self.path.parents):
            if folder.exists():
                break
            top = folder
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise CheckpointError(f"{self.path}: cannot create the run directory ({err.strerror or err})") from None
        return top

    @contextmanager
    def setting_up(self) -> Iterator[RunFolder]:
        """Run a set-up step: if it raises, :meth:`undo` (rank 0) and re-raise."""
        try:
            yield self
        except BaseException:
            if self.dist.is_main:
                self.undo()
            raise

    def undo(self) -> None:
        """A set-up that failed before the run was written leaves the folder as it found it (and unlocked)."""
        if self.config_written:  # the run exists now (and can be resumed): keep it
            self.release()
            return
        if self._created is not None:
            shutil.rmtree(self._created, ignore_errors=True)
        elif self.path.is_dir():
            for name in set(os.listdir(self.path)) - self._entries_before - {LOCK_FILE}:
                entry = self.path / name
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    entry.unlink(missing_ok=True)
        if self.lock is not None:
            self.lock.release(remove=self._created is None)

    def release(self) -> None:
        """Release the folder (its lock); safe to call more than once."""
        if self.lock is not None:
            self.lock.release()


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl`` file (empty if it does not exist)."""
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
