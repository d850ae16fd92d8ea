"""Where the data sets live: one rule, used by every loader.

The benchmark files are large and carry their own licences, so they are never
part of the repository: the caller says where they are, by option or by the
environment variable :data:`DEFAULT_DATA_ENV`.
"""

from __future__ import annotations

import os
import pathlib

#: Environment variable read when no data directory is given explicitly.
DEFAULT_DATA_ENV = "ASAP_DATA_DIR"


def resolve_data_dir(data_dir: str | os.PathLike | None) -> pathlib.Path:
    """Return the data directory: ``data_dir`` if given, else ``$ASAP_DATA_DIR``.

    The explicit option wins so that one command can point at another copy
    without touching the environment.

    Raises:
        FileNotFoundError: neither is set (the message names both ways to set
            it), or the chosen path is not an existing directory.
    """
    if data_dir is not None and str(data_dir) != "":
        path, origin = pathlib.Path(data_dir), "the data_dir option"
    else:
        from_env = os.environ.get(DEFAULT_DATA_ENV, "")
        if not from_env:
            raise FileNotFoundError(
                "no data directory given: pass it as an option (data_dir=..., or --data-dir on the "
                f"command line) or set the environment variable {DEFAULT_DATA_ENV}"
            )
        path, origin = pathlib.Path(from_env), f"${DEFAULT_DATA_ENV}"
    path = path.expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"data directory {str(path)!r} (from {origin}) does not exist or is not a directory")
    return path


def find_first(candidates: list[pathlib.Path], *, what: str, official: str) -> pathlib.Path:
    """Return the first existing path of ``candidates``.

    Raises:
        FileNotFoundError: none exists; the message lists every path tried and
            names the official file so the user knows what to download.
    """
    for path in candidates:
        if path.exists():
            return path
    tried = "\n  ".join(str(path) for path in candidates)
    raise FileNotFoundError(f"{what} not found; looked for:\n  {tried}\nexpected the official file {official}")
