"""One process per run folder (D12): a second user of the folder is refused at once, before writing."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from asap.train import train
from asap.train.checkpoint import LOCK_FILE, METRICS_FILE
from asap.train.lock import RunLock, RunLockedError


def listing(folder: Path) -> dict[str, float]:
    return {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}


def test_a_second_lock_on_one_folder_is_refused(tmp_path):
    first = RunLock(tmp_path)
    with pytest.raises(RunLockedError, match="in use by another asap process"):
        RunLock(tmp_path)
    first.release()
    RunLock(tmp_path).release()  # free again once released


def test_training_in_a_locked_folder_is_refused_and_writes_nothing(tiny_config):
    config = tiny_config("busy", stop_after_steps=2)
    train(config)
    run = Path(config.out_dir)
    holder = RunLock(run)  # another process training here (flock conflicts between two opens)
    before = listing(run)
    try:
        with pytest.raises(RunLockedError, match=f"{run} is in use"):
            train(tiny_config("busy"), resume=True)
    finally:
        holder.release()
    assert listing(run) == before  # metrics.jsonl, checkpoint, config: untouched
    result = train(tiny_config("busy"), resume=True)  # the lock is gone with its holder
    assert result["completed"]
    assert (run / LOCK_FILE).exists() and (run / METRICS_FILE).exists()


def test_the_lock_is_released_when_the_holder_dies(tmp_path):
    pid = os.fork()
    if pid == 0:  # child: take the lock and exit without releasing it
        RunLock(tmp_path)
        os._exit(0)
    os.waitpid(pid, 0)
    RunLock(tmp_path).release()  # the kernel dropped the dead process's lock
