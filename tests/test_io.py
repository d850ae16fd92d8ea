"""asap.io: atomic writes and strict JSON (moved here from tests/train/test_checkpoint.py with the writers)."""

from __future__ import annotations

import json
import math
import os

import pytest

from asap.io import WriteError, append_json_line, atomic_write_bytes, atomic_write_json


def test_interrupted_write_keeps_the_previous_file(tmp_path, monkeypatch):
    target = tmp_path / "file.bin"
    atomic_write_bytes(target, b"good")

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_bytes(target, b"partial")
    assert target.read_bytes() == b"good"
    assert [p.name for p in tmp_path.iterdir()] == ["file.bin"]  # no temporary left behind


def test_json_is_strict_everywhere(tmp_path):
    atomic_write_json(tmp_path / "a.json", {"loss": float("nan"), "x": [float("inf"), 1.5], "t": (1, -math.inf)})
    text = (tmp_path / "a.json").read_text()
    assert json.loads(text, parse_constant=lambda c: pytest.fail(c)) == {"loss": None, "x": [None, 1.5], "t": [1, None]}
    append_json_line(tmp_path / "m.jsonl", {"train_loss": float("nan")})
    assert (tmp_path / "m.jsonl").read_text() == '{"train_loss": null}\n'


def test_a_full_disk_names_the_file(tmp_path, monkeypatch):
    import errno

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(WriteError, match=r"x\.json: cannot write \(No space left on device\)") as info:
        atomic_write_json(tmp_path / "x.json", {})
    assert isinstance(info.value, OSError) and info.value.errno == errno.ENOSPC
    assert list(tmp_path.iterdir()) == []
