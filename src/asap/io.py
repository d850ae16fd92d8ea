"""File IO at the bottom of the house: atomic writes, strict JSON, safe names inside a folder.

Writing. Every file the library writes (configs, weights, manifests, results,
tokenizers) goes through :func:`atomic_write_bytes`: a temporary file in the
same directory, flushed to disk, then ``os.replace``-d over the target, so an
interrupted write leaves the previous good file untouched and a concurrent
reader never sees half a file. JSON is strict (:func:`dumps_strict`: no bare
``NaN``/``Infinity``; a non-finite number is written as null). A failed write
is a one-line :class:`WriteError` naming the file.

Recording. Every result records the command that produced it, one way:
:func:`command_line` spells it (shell-quoted, pasteable), :func:`write_result`
writes a result JSON and :func:`record_command` puts its ``file.json: command``
line in ``command.txt`` beside it (what ``asap report`` reads); a training run's
folder keeps every command that built it (:func:`append_command`). Methods are
named in result JSON by one scheme, :func:`method_key` (``sinkhorn_k3``).

Reading. Every file name read from a config or a manifest (a tokenizer, a weights file)
is untrusted: a run folder or an artifact may come from someone else. Such a
name must be a plain file name that stays inside its folder; anything else
(``..``, an absolute path, a separator, a symlink pointing out) is refused
before any file is opened. A JSON file is parsed by :func:`read_json` (size and
depth bounded), its ``format``/``format_version`` checked by :func:`check_format`,
and its values by :func:`is_int` / :func:`is_finite_number` (``true`` is no integer).
"""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from asap.errors import AsapError, UnsafePathError

#: Configs, manifests and records are a few KiB; a file this large is not one (and is not read into memory).
MAX_JSON_BYTES = 16 * 2**20

_UMASK = os.umask(0)
os.umask(_UMASK)


class WriteError(AsapError, OSError):
    """A file that could not be written (disk full, read-only, ...); the message names the file."""


# --------------------------------------------------------------------------- atomic files


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see either the old file or the complete new one."""
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as err:
        raise _write_error(path, err) from err
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp creates 0600; give the usual permissions
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        Path(tmp).unlink(missing_ok=True)
        raise _write_error(path, err) from err
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """:func:`atomic_write_bytes` of ``text`` encoded as UTF-8."""
    atomic_write_bytes(path, text.encode("utf-8"))


def _write_error(path: Path, err: OSError) -> WriteError:
    """``err`` (often a bare "[Errno 28] No space left on device") as a one-line error naming ``path``."""
    if isinstance(err, WriteError):
        return err
    error = WriteError(f"{path}: cannot write ({err.strerror or err})")
    error.errno = err.errno
    return error


def strict_json_value(obj: Any) -> Any:
    """``obj`` with every non-finite float (NaN, +-inf) replaced by None, tuples as lists: valid strict JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: strict_json_value(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict_json_value(v) for v in obj]
    return obj


def dumps_strict(obj: Any, **kwargs: Any) -> str:
    """``json.dumps`` that never writes a bare ``NaN``/``Infinity`` (those become null)."""
    return json.dumps(strict_json_value(obj), allow_nan=False, **kwargs)


def atomic_write_json(path: str | os.PathLike, obj: Any, *, indent: int = 2) -> None:
    """Write ``obj`` as strict JSON (non-finite numbers as null) with a final newline, atomically."""
    atomic_write_text(path, dumps_strict(obj, indent=indent, sort_keys=False) + "\n")


def append_json_line(path: str | os.PathLike, obj: Any) -> None:
    """Append ``obj`` as one strict-JSON line (``metrics.jsonl``); the file is named if the write fails."""
    path = Path(path)
    try:
        with open(path, "a") as f:
            f.write(dumps_strict(obj) + "\n")
    except OSError as err:
        raise _write_error(path, err) from err


# --------------------------------------------------------------------------- the command behind a result

#: The file beside results (or in a run folder) that names the commands that produced them.
COMMAND_FILE = "command.txt"


def command_line(program: str, argv: Sequence[str]) -> str:
    """The shell command ``program ARGV...``, each argument quoted so that the line pastes back into a shell.

    ``program`` is written as is (``"asap bench accuracy"``, ``"python -m asap.bench.operators"``). ``argv``
    may start with the program's own words after the first (``sys.argv[1:]`` of ``asap bench accuracy ...``
    is ``["bench", "accuracy", ...]``); they are not repeated.
    """
    words = program.split()[1:]
    argv = list(argv)
    if words and argv[: len(words)] == words:
        argv = argv[len(words) :]
    return " ".join([program, shlex.join(argv)]).rstrip()


def record_command(result: str | os.PathLike, command: str) -> Path:
    """Record ``command`` as the one that produced the file ``result``, in ``command.txt`` beside it.

    The file holds one ``name: command`` line per result of its folder, sorted; the line of ``result``
    replaces any earlier one. Written atomically; returns the path of ``command.txt``.
    """
    result = Path(result)
    commands = result.parent / COMMAND_FILE
    lines = commands.read_text().splitlines() if commands.exists() else []
    lines = [line for line in lines if not line.startswith(f"{result.name}: ")]
    lines.append(f"{result.name}: {command}")
    atomic_write_text(commands, "\n".join(sorted(lines)) + "\n")
    return commands


def write_result(path: str | os.PathLike, doc: Mapping[str, Any], *, command: str, indent: int = 2) -> Path:
    """Write the result ``doc`` as strict JSON to ``path`` (its folder created) and :func:`record_command` it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, doc, indent=indent)
    record_command(path, command)
    return path


def append_command(folder: str | os.PathLike, command: str) -> Path:
    """Append ``command`` to ``folder/command.txt``: a run folder keeps every command that built it, in order."""
    path = Path(folder) / COMMAND_FILE
    try:
        with open(path, "a") as f:
            f.write(command + "\n")
    except OSError as err:
        raise _write_error(path, err) from err
    return path


# --------------------------------------------------------------------------- method keys

#: The letter of each size option in a method key, in the order they are written.
_KEY_LETTERS = {"num_slices": "l", "extra_steps": "j", "n_iters": "k"}


def method_key(method: str, **sizes: int) -> str:
    """The key naming an attention method (and its sizes) in result JSON, one scheme for every writer.

    ``method_key("sinkhorn", n_iters=3)`` is ``"sinkhorn_k3"``, ``method_key("asap", num_slices=16)``
    ``"asap_l16"``, ``method_key("asap", num_slices=16, extra_steps=2)`` ``"asap_l16_j2"``; without sizes,
    the method itself (``"softmax"``, ``"asap"``). Results written before this scheme spelled Sinkhorn
    ``sinkhorn_K3``; ``asap report`` reads both.
    """
    unknown = sorted(set(sizes) - set(_KEY_LETTERS))
    if unknown:
        raise TypeError(f"method_key: unknown size option(s) {unknown}; known: {sorted(_KEY_LETTERS)}")
    return "_".join([method, *(f"{_KEY_LETTERS[name]}{int(sizes[name])}" for name in _KEY_LETTERS if name in sizes)])


_KEY_PATTERN = re.compile(r"([a-z]+)((?:_[ljkLJK][0-9]+)*)")


def parse_method_key(key: object) -> tuple[str, dict[str, int]] | None:
    """The inverse of :func:`method_key`, for readers: ``("sinkhorn", {"n_iters": 3})`` from ``"sinkhorn_k3"``.

    Also reads the older spelling ``"sinkhorn_K3"``. ``None`` for anything that is not a method key.
    """
    match = _KEY_PATTERN.fullmatch(key) if isinstance(key, str) else None
    if match is None:
        return None
    names = {letter: name for name, letter in _KEY_LETTERS.items()}
    sizes = {names[part[0].lower()]: int(part[1:]) for part in match.group(2).split("_")[1:]}
    return match.group(1), sizes


def method_of(key: object) -> str | None:
    """The method a result key names (``"sinkhorn"`` for ``"sinkhorn_k3"`` or ``"sinkhorn_K3"``), else ``None``."""
    parsed = parse_method_key(key)
    return None if parsed is None else parsed[0]


# --------------------------------------------------------------------------- safe reading


def file_inside(folder: str | os.PathLike, name: object, *, what: str) -> Path:
    """``folder / name`` for a plain file name ``name`` that resolves inside ``folder``.

    ``what`` names the field the name was read from, for the message (for example
    ``"config.json: data.tokenizer"``). Raises :class:`UnsafePathError` otherwise.
    Nothing is opened; the file need not exist.
    """
    if not isinstance(name, str) or not name:
        raise UnsafePathError(f"{what}: expected a plain file name, got {name!r}")
    if name in (".", "..") or "/" in name or "\\" in name or "\x00" in name or Path(name).name != name:
        raise UnsafePathError(f"{what}: {name!r} is not a plain file name inside {os.fspath(folder)}")
    folder = Path(folder)
    path = folder / name
    root = folder.resolve()
    if path.resolve().parent != root:  # a symlink that leads out of the folder
        raise UnsafePathError(f"{what}: {name!r} leads outside {os.fspath(folder)}")
    return path


def read_json(path: str | os.PathLike, *, error: type[Exception] = AsapError, what: str = "file") -> Any:
    """Parse the JSON file ``path``; anything else is ``error`` with a one-line message naming the file.

    Refused: a missing or unreadable file, one over :data:`MAX_JSON_BYTES`, bytes
    that are not UTF-8 JSON, and nesting too deep for the parser. ``error`` is the
    caller's own :class:`AsapError` subclass (a run config's, a manifest's, ...).
    """
    path = Path(path)
    if not path.is_file():
        raise error(f"{path}: file not found")
    try:
        if path.stat().st_size > MAX_JSON_BYTES:
            raise error(f"{path}: {path.stat().st_size} bytes, too large for a {what}")
        return json.loads(path.read_bytes().decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise error(f"{path}: not valid JSON ({err})") from None
    except RecursionError:
        raise error(f"{path}: not a {what} (JSON nested too deeply)") from None
    except OSError as err:
        raise error(f"{path}: cannot read ({err.strerror or err})") from None


def is_int(value: Any) -> bool:
    """``value`` is a JSON integer: an ``int`` and not a ``bool`` (``true`` is not ``1`` in a file we read)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_finite_number(value: Any) -> bool:
    """``value`` is a finite JSON number: an ``int`` or ``float``, not a ``bool``, neither NaN nor infinite."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_format(
    doc: Any, *, fmt: str, version: int, source: str | os.PathLike, error: type[Exception] = AsapError,
    kind: str = "file",
) -> dict[str, Any]:
    """``doc``, a parsed JSON file, when it is an object with ``"format": fmt`` and ``"format_version": version``;
    otherwise ``error`` naming ``source`` (``not an 'FMT' KIND``, or the version found and the one read)."""
    if not isinstance(doc, dict) or doc.get("format") != fmt:
        raise error(f"{source}: not an {fmt!r} {kind}")
    if doc.get("format_version") != version:
        raise error(f"{source}: format version {doc.get('format_version')!r}, this asap reads {version}")
    return doc
