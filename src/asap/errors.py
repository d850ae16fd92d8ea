"""The project's error hierarchy: what the command line reports as one line.

:class:`AsapError` is a problem with the user's input (an option, a file, a
config, a manifest): the message names the problem (and the file, where there
is one), and ``asap`` prints it on one line and exits with status 2. Anything
else that escapes is a bug and keeps its traceback.
"""

from __future__ import annotations


class AsapError(Exception):
    """A user-facing error: bad input, a bad or unsafe file. One line, naming the problem."""


class ConfigError(AsapError, ValueError):
    """An option or a config value that is refused (also a ValueError, for library callers)."""


class UnsafePathError(AsapError, ValueError):
    """A file name read from a config or manifest that is not a plain name inside its folder."""
