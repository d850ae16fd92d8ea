"""asap.io: atomic writes and strict JSON (moved here from tests/train/test_checkpoint.py with the writers), commands."""

from __future__ import annotations

import json
import math
import os

import pytest

from asap.io import (
    WriteError,
    append_command,
    append_json_line,
    atomic_write_bytes,
    atomic_write_json,
    command_line,
    method_key,
    method_of,
    parse_method_key,
    record_command,
    write_result,
)


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


def test_command_line_quotes_and_does_not_repeat_the_program():
    assert command_line("asap bench accuracy", ["bench", "accuracy", "--suite", "digits"]) == (
        "asap bench accuracy --suite digits"
    )
    assert command_line("python -m asap.bench.operators", ["--out", "a b.json"]) == (
        "python -m asap.bench.operators --out 'a b.json'"
    )


def test_each_result_has_one_command_line_beside_it(tmp_path):
    write_result(tmp_path / "b.json", {"x": 1}, command="asap bench b")
    write_result(tmp_path / "a.json", {"x": 2}, command="asap bench a --old")
    record_command(tmp_path / "a.json", "asap bench a --new")
    assert (tmp_path / "command.txt").read_text() == "a.json: asap bench a --new\nb.json: asap bench b\n"
    assert json.loads((tmp_path / "b.json").read_text()) == {"x": 1}
    (tmp_path / "run").mkdir()
    append_command(tmp_path / "run", "asap train")
    append_command(tmp_path / "run", "asap train --resume")
    assert (tmp_path / "run" / "command.txt").read_text() == "asap train\nasap train --resume\n"


def test_one_method_key_scheme_and_its_inverse_reads_the_older_spelling():
    assert method_key("sinkhorn", n_iters=3) == "sinkhorn_k3"
    assert method_key("asap", num_slices=16, extra_steps=2) == "asap_l16_j2"
    assert method_key("softmax") == "softmax"
    assert parse_method_key("sinkhorn_k3") == parse_method_key("sinkhorn_K3") == ("sinkhorn", {"n_iters": 3})
    assert method_of("sinkhorn_K11") == "sinkhorn" and method_of("num_samples") is None
    with pytest.raises(TypeError, match="unknown size"):
        method_key("sinkhorn", iters=3)
