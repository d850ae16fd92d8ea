"""File IO at the bottom of the house: safe names inside a folder.

Every file name read from a config or a manifest (a tokenizer, a weights file)
is untrusted: a run folder or an artifact may come from someone else. Such a
name must be a plain file name that stays inside its folder; anything else
(``..``, an absolute path, a separator, a symlink pointing out) is refused
before any file is opened.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from asap.errors import AsapError, UnsafePathError

#: Configs, manifests and records are a few KiB; a file this large is not one (and is not read into memory).
MAX_JSON_BYTES = 16 * 2**20


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
