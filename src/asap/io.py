"""File IO at the bottom of the house: safe names inside a folder.

Every file name read from a config or a manifest (a tokenizer, a weights file)
is untrusted: a run folder or an artifact may come from someone else. Such a
name must be a plain file name that stays inside its folder; anything else
(``..``, an absolute path, a separator, a symlink pointing out) is refused
before any file is opened.
"""

from __future__ import annotations

import os
from pathlib import Path

from asap.errors import UnsafePathError


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
