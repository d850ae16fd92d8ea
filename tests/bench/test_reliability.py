"""The reliability probe (scripts/reliability_probe.py) on a tiny subset, and its section of the report."""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest

from asap.report import generate_report
from asap.report.reliability import RELIABILITY_SCHEMA
from tests.conftest import REPO_ROOT


@pytest.fixture(scope="module")
def probe():
    spec = importlib.util.spec_from_file_location("reliability_probe", REPO_ROOT / "scripts" / "reliability_probe.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up while the class is built
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


def test_probe_subset_writes_counts_per_surface_and_outcome(probe, tmp_path, capsys):
    out = tmp_path / "reliability.json"
    assert probe.main(["--out", str(out), "--surfaces", "attention,loaders,cli", "--limit", "2"]) == 0
    doc = json.loads(out.read_text())
    assert doc["schema"] == RELIABILITY_SCHEMA == probe.SCHEMA
    assert doc["command"].startswith("python scripts/reliability_probe.py --out")
    assert doc["machine"]["cpu_count"] and doc["total"] == len(doc["cases"]) == 6
    assert set(doc["counts"]) == {"attention", "loaders", "cli"}
    for surface, counts in doc["counts"].items():
        assert set(counts) == set(probe.OUTCOMES) and sum(counts.values()) == doc["tried"][surface] == 2
    for case in doc["cases"]:
        assert case["as_expected"] and case["outcome"] in probe.OUTCOMES and case["message"], case
        assert "<sandbox>" in case["message"] or case["surface"] == "attention" or "--" in case["message"], case
    assert doc["as_expected"] == 6 and doc["unexpected"] == []


def test_probe_classifies_wrong_answers_as_wrong(probe):
    def accepted():
        return torch_ones()

    def torch_ones():
        import torch

        return torch.ones(1)

    cases = [
        probe.Case("attention", "bad input accepted", "refuse", accepted),
        probe.Case("attention", "raw ZeroDivisionError", "refuse", lambda: 1 / 0),
        probe.Case("attention", "wrong result", "compute", lambda: (False, "max |out - fp64 ref| = 0.9")),
        probe.Case("loaders", "a ValueError that is not a named asap error", "refuse",
                   lambda: (_ for _ in ()).throw(ValueError("x"))),  # fmt: skip
        probe.Case("attention", "valid input refused", "compute", lambda: (_ for _ in ()).throw(ValueError("no"))),
        probe.Case("attention", "refused", "refuse", lambda: (_ for _ in ()).throw(TypeError("q must be float"))),
    ]
    records = [probe.classify(case) for case in cases]
    assert [r.outcome for r in records] == ["WRONG", "WRONG", "WRONG", "WRONG", "refused", "refused"]
    assert [r.as_expected for r in records] == [False, False, False, False, False, True]
    summary = probe.summarise(records)
    assert summary["counts"]["attention"] == {"exit_2": 0, "refused": 2, "correct": 0, "WRONG": 3}
    assert summary["as_expected"] == 1 and len(summary["unexpected"]) == 5


def _reliability_doc(*, wrong: int) -> dict:
    counts = {"attention": {"exit_2": 0, "refused": 7, "correct": 5, "WRONG": wrong},
              "cli": {"exit_2": 4, "refused": 0, "correct": 0, "WRONG": 0}}  # fmt: skip
    total = sum(sum(c.values()) for c in counts.values())
    unexpected = [{"surface": "attention", "input": "asap: transposed q", "expect": "compute", "outcome": "WRONG",
                   "as_expected": False, "message": "max |out - fp64 ref| = 9.0e-01 (limit 2e-05)"}] * wrong
    return {"schema": RELIABILITY_SCHEMA, "command": "python scripts/reliability_probe.py --out x.json",
            "machine": {"cpu_model": "Synthetic CPU 9000", "cpu_count": 2, "torch_threads": 2},
            "outcomes": ["exit_2", "refused", "correct", "WRONG"], "counts": counts,
            "tried": {s: sum(c.values()) for s, c in counts.items()}, "total": total,
            "as_expected": total - wrong, "unexpected": unexpected, "cases": []}  # fmt: skip


def test_report_has_a_reliability_section_from_the_json(tmp_path):
    root = tmp_path / "results"
    (root / "reliability").mkdir(parents=True)
    (root / "reliability" / "reliability.json").write_text(json.dumps(_reliability_doc(wrong=0)))
    text = generate_report(root).read_text()
    section = text.split("## Reliability", 1)[1].split("\n## ", 1)[0]
    assert "| attention | 12 | 0 | 7 | 5 | 0 |" in section and "| cli | 4 | 4 | 0 | 0 | 0 |" in section
    assert "| **all** | 16 | 4 | 7 | 5 | 0 |" in section
    assert "16 of 16 inputs answered as expected" in section and "NOT as expected" not in section
    assert "Synthetic CPU 9000" in section and "`python scripts/reliability_probe.py --out x.json`" in section

    (root / "reliability" / "reliability.json").write_text(json.dumps(_reliability_doc(wrong=1)))
    section = generate_report(root).read_text().split("## Reliability", 1)[1]
    assert "16 of 17 inputs answered as expected; 1 NOT as expected:" in section
    assert "- attention: asap: transposed q -> WRONG (max |out - fp64 ref| = 9.0e-01 (limit 2e-05))" in section


def test_report_without_the_json_says_which_command_produces_it(tmp_path):
    root = tmp_path / "results"
    root.mkdir()
    text = generate_report(root).read_text()
    section = text.split("## Reliability", 1)[1].split("\n## ", 1)[0]
    assert "Not available yet" in section and "scripts/reliability_probe.py" in section
