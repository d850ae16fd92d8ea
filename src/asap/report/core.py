"""What every section shares: the loaded file (:class:`Doc`), a section's output (:class:`Rendered`), the
:class:`Section` record, loading a section's JSON (:func:`load_docs`), the number formats, the Markdown
table, the machine line and the command that produced a result.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from asap.io import method_key, parse_method_key


@dataclass(frozen=True)
class Doc:
    """One loaded result file: its path relative to the results directory and its parsed JSON."""

    rel: str
    path: Path
    data: dict[str, Any]

    @property
    def schema(self) -> str | None:
        return self.data.get("schema") or self.data.get("benchmark")


@dataclass
class Rendered:
    """A section's Markdown lines and the plot files it wrote."""

    lines: list[str] = field(default_factory=list)
    plots: list[Path] = field(default_factory=list)


Renderer = Callable[[list[Doc], Path], Rendered]


@dataclass(frozen=True)
class Section:
    """A part of the README: which JSON it reads, how it renders, and what to say when the JSON is absent."""

    key: str
    title: str
    patterns: tuple[str, ...]
    render: Renderer
    absent: str
    schemas: tuple[str, ...] | None = None  # keep only files of these schemas (None: any)
    #: its writers name methods by :func:`asap.io.method_key`: older files' ``sinkhorn_K3`` is read as ``sinkhorn_k3``
    method_keys: bool = False


def fmt_time(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "-"
    if seconds >= 1:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.1f} ms"
    return f"{seconds * 1e6:.0f} us"


def fmt_bytes(nbytes: float | None) -> str:
    if nbytes is None:
        return "-"
    mib = nbytes / 2**20
    if mib >= 1024:
        return f"{mib / 1024:.2f} GiB"
    return f"{mib:.1f} MiB" if mib >= 0.1 else f"{nbytes / 1024:.1f} KiB"


def fmt_ratio(ratio: float | None) -> str:
    return "-" if ratio is None else f"{ratio:.2f}x"


def sinkhorn_key(n_iters: int | None) -> str | None:
    """The result key of Sinkhorn with ``n_iters`` half-steps (:func:`asap.io.method_key`)."""
    return None if n_iters is None else method_key("sinkhorn", n_iters=n_iters)


def _current_method_keys(value: Any) -> Any:
    """``value`` (parsed JSON) with every method key, as a key or a string value, in :func:`asap.io.method_key`'s
    spelling: results written before it say ``sinkhorn_K3`` where new ones say ``sinkhorn_k3``."""
    if isinstance(value, dict):
        return {_current_method_keys(k): _current_method_keys(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_current_method_keys(v) for v in value]
    parsed = parse_method_key(value)
    return method_key(parsed[0], **parsed[1]) if parsed else value


def table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[str]:
    """A Markdown table (first column left-aligned, the others right-aligned)."""
    align = [":--"] + ["--:"] * (len(header) - 1)
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return lines


def machine_line(machine: dict[str, Any] | None) -> str:
    if not machine:
        return "Machine: not recorded."
    gpu = machine.get("gpu")
    gpu_text = f", GPU {gpu['name']}" if isinstance(gpu, dict) else (f", GPU {gpu}" if gpu else ", no GPU")
    rev = machine.get("git_revision") or "unknown"
    dirty = " (uncommitted changes)" if machine.get("git_dirty") else ""
    load = machine.get("load_average")
    load_text = f"; load average at start {load[0]:.2f}" if load else ""
    return (
        f"Machine: {machine.get('cpu_model', 'unknown CPU')}, {machine.get('cpu_count', '?')} cores "
        f"({machine.get('torch_threads', '?')} torch threads){gpu_text}; torch {machine.get('torch', '?')}; "
        f"git {str(rev)[:10]}{dirty}; {machine.get('date_utc', machine.get('date', 'date unknown'))}{load_text}."
    )


def pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f}"


def scalar(x: Any) -> str:
    if isinstance(x, float):
        return f"{x:.4g}"
    return str(x)


def recorded_command(doc: Doc) -> str | None:
    """The command that produced ``doc``: its line in ``command.txt`` beside it, else its ``command`` field.

    ``command.txt`` holds ``file.json: command`` lines (:func:`asap.io.record_command`) or, as
    the experiment driver wrote it before, for a directory holding one result, the bare command.
    Its line wins over the JSON's own field because it names the command to rerun
    (a wrapper script, the repository's paths) where the field records the process's argv.
    """
    commands = doc.path.parent / "command.txt"
    lines = [line for line in commands.read_text().splitlines() if line.strip()] if commands.exists() else []
    for line in lines:
        name, _, command = line.partition(": ")
        if name == doc.path.name:
            return command
    recorded = doc.data.get("command")
    if recorded:
        return " ".join(map(str, recorded)) if isinstance(recorded, list) else str(recorded)
    if len(lines) == 1 and not lines[0].split(" ", 1)[0].endswith(".json:"):
        return lines[0]
    return None


def sibling_json(doc: Doc, name: str) -> dict[str, Any]:
    """The JSON file ``name`` beside a result (a run's ``config.json``), or ``{}`` if it is absent or unreadable."""
    path = doc.path.parent / name
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def load_docs(results_dir: Path, section: Section) -> tuple[list[Doc], list[str]]:
    """The section's JSON files (sorted, unique) and notes on files skipped as unreadable or of another schema."""
    docs, notes, seen = [], [], set()
    for pattern in section.patterns:
        for path in sorted(results_dir.glob(pattern)):
            if path in seen or not path.is_file():
                continue
            seen.add(path)
            rel = path.relative_to(results_dir).as_posix()
            try:
                data = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError) as err:
                notes.append(f"`{rel}` could not be read ({err}); skipped.")
                continue
            doc = Doc(rel, path, (_current_method_keys(data) if section.method_keys else data)
                      if isinstance(data, dict) else {"value": data})
            if section.schemas is not None and doc.schema not in section.schemas:
                notes.append(f"`{rel}` has schema `{doc.schema}`, not {section.schemas}; skipped.")
                continue
            docs.append(doc)
    return docs, notes


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the non-interactive Agg backend, imported on the first plot (only the plots need
    matplotlib, and it is slow to import)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def style_axes(
    ax: Any, *, xlabel: str, ylabel: str, title: str | None = None, x_base: int = 10, log_y: bool = False,
    legend_size: int = 7,
) -> None:
    """The report's axes: log ``x`` (base ``x_base``), log ``y`` if ``log_y``, the labels, ``title`` when
    given, a light grid on major and minor ticks and a small legend (the same style for every plot)."""
    ax.set_xscale("log", base=x_base)
    if log_y:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title is not None:
        ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=legend_size)


def save_figure(fig: Any, path: Path) -> Path:
    """Lay out, write (PNG, 110 dpi, the same for every plot of the report) and close ``fig``; returns ``path``."""
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    pyplot().close(fig)
    return path
