"""The command line's argument types: they live in :mod:`asap.argtypes` (the benchmark parsers below the CLI use
them too); this module keeps the import path the sub-commands use."""

from asap.argtypes import finite_float, int_list, name_list, nonnegative_int, positive_float, positive_int

__all__ = ["finite_float", "int_list", "name_list", "nonnegative_int", "positive_float", "positive_int"]
