"""The command line's error policy as a table (issue 12 items 2, 13 and 16).

A user error is ONE line on stderr naming the problem (the option, or the
path as typed), exit status 2, no traceback, and nothing written anywhere; a
training run that would go wrong (negative clip, negative learning rate,
infinite eps, ...) is refused at the boundary rather than finishing with exit
0; ASAP with a never-fitted dual map is refused unless asked for explicitly;
SIGTERM exits 143 (128 + 15), not 130.
"""

from __future__ import annotations

import json
import os
import signal

import pytest

from asap.cli.main import main

TINY = ["--dataset", "digits", "--limit", "200", "--dim", "16", "--depth", "1", "--heads", "2",
        "--batch-size", "16", "--device", "cpu", "--no-progress"]  # fmt: skip

# (id, argv with {tmp} for the test folder, fragment the one-line message must contain)
BAD_INPUT = [
    ("grad-clip-negative", ["train", *TINY, "--grad-clip", "-1", "--out", "{tmp}/r"], "--grad-clip"),
    ("min-lr-ratio-negative", ["train", *TINY, "--min-lr-ratio", "-1", "--out", "{tmp}/r"], "--min-lr-ratio"),
    ("eps-inf", ["train", *TINY, "--eps", "inf", "--out", "{tmp}/r"], "--eps"),
    ("lr-nan", ["train", *TINY, "--lr", "nan", "--out", "{tmp}/r"], "--lr"),
    ("weight-decay-negative", ["train", *TINY, "--weight-decay", "-1", "--out", "{tmp}/r"], "--weight-decay"),
    ("stop-after-steps-0", ["train", *TINY, "--stop-after-steps", "0", "--out", "{tmp}/r"], "--stop-after-steps"),
    ("patch-size-0", ["train", *TINY, "--patch-size", "0", "--out", "{tmp}/r"], "--patch-size"),
    ("train-eval-batch-size-0", ["train", *TINY, "--eval-batch-size", "0", "--out", "{tmp}/r"], "--eval-batch-size"),
    ("batch-size-0", ["train", *TINY, "--batch-size", "0", "--out", "{tmp}/r"], "--batch-size"),
    ("val-fraction-0", ["train", *TINY, "--val-fraction", "0", "--out", "{tmp}/r"], "--val-fraction"),
    ("unknown-dataset", ["train", *TINY, "--dataset", "nope", "--out", "{tmp}/r"], "--dataset"),
    ("train-asap-unfitted", ["train", *TINY, "--method", "asap", "--out", "{tmp}/r"], "--allow-unfitted"),
    ("resume-nothing", ["train", "--resume", "{tmp}/missing"], "missing"),
    ("eval-typo-path", ["eval", "{tmp}/typo_run"], "typo_run"),
    ("eval-batch-size-0", ["eval", "{tmp}/typo_run", "--batch-size", "0"], "--batch-size"),
    ("eval-batch-size-negative", ["eval", "{tmp}/typo_run", "--batch-size", "-5"], "--batch-size"),
    ("compile-typo-path", ["compile", "{tmp}/typo_run", "--calibration", "8", "--out", "{tmp}/c"], "typo_run"),
    ("compile-calibration-0", ["compile", "{tmp}/typo_run", "--calibration", "0", "--out", "{tmp}/c"], "--calibration"),
    ("compile-batch-size-0", ["compile", "{tmp}/typo_run", "--calibration", "8", "--batch-size", "0", "--out", "{tmp}/c"],
     "--batch-size"),
    ("compile-slices-0", ["compile", "{tmp}/typo_run", "--calibration", "8", "--slices", "0", "--out", "{tmp}/c"], "--slices"),
    ("compile-ridge-nan", ["compile", "{tmp}/typo_run", "--calibration", "8", "--ridge", "nan", "--out", "{tmp}/c"], "--ridge"),
    ("compile-ridge-negative", ["compile", "{tmp}/typo_run", "--calibration", "8", "--ridge", "-1", "--out", "{tmp}/c"],
     "ridge must be >= 0"),
    ("compile-holdout-2", ["compile", "{tmp}/typo_run", "--calibration", "8", "--holdout", "2", "--out", "{tmp}/c"],
     "holdout_fraction"),
    ("report-missing-results", ["report", "--results", "{tmp}/nowhere"], "--results"),
    ("unknown-option", ["train", "--no-such-option"], "--no-such-option"),
    ("unknown-command", ["frobnicate"], "frobnicate"),
]


def _tree(root):
    return sorted(os.path.relpath(os.path.join(d, n), root) for d, dirs, files in os.walk(root) for n in dirs + files)


@pytest.mark.parametrize("argv, fragment", [c[1:] for c in BAD_INPUT], ids=[c[0] for c in BAD_INPUT])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys, argv, fragment):
    (tmp_path / "keep.txt").write_text("x")
    before = _tree(tmp_path)
    code = main([a.replace("{tmp}", str(tmp_path)) for a in argv])
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert code == 2, (code, captured.err)
    assert len(lines) == 1 and "Traceback" not in captured.err, captured.err
    assert lines[0].startswith("asap") and fragment in lines[0], lines[0]
    assert _tree(tmp_path) == before


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli_errors") / "digits_sk3"
    assert main(["train", *TINY, "--method", "sinkhorn", "--n-iters", "3", "--epochs", "1", "--out", str(out)]) == 0
    return out


def test_evaluating_an_unfitted_asap_model_is_refused_unless_asked(teacher_run, capsys):
    before = _tree(teacher_run)
    capsys.readouterr()
    assert main(["eval", str(teacher_run), "--method-override", "asap", "--limit", "50"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "never fitted" in err and "--allow-unfitted" in err, err
    assert _tree(teacher_run) == before
    out = teacher_run.parent / "unfitted.json"
    args = ["eval", str(teacher_run), "--method-override", "asap", "--limit", "50", "--allow-unfitted"]
    assert main([*args, "--output", str(out)]) == 0  # asked for explicitly: it runs
    assert json.loads(out.read_text())["attention"]["method"] == "asap"


def test_sigterm_exits_143_with_one_line(monkeypatch, tmp_path, capsys):
    import asap.cli.report as report_cli

    def terminated(args):
        os.kill(os.getpid(), signal.SIGTERM)
        raise AssertionError("SIGTERM did not interrupt the command")

    monkeypatch.setattr(report_cli, "run_report", terminated)
    assert main(["report", "--results", str(tmp_path)]) == 143
    assert capsys.readouterr().err.strip() == "asap report: terminated"
