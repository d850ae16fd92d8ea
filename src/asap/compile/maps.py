"""Compatibility names: the dual-map family now lives in :mod:`asap.attention.dual_map`.

Kept so that ``from asap.compile.maps import ...`` in user code and older
scripts keeps working; new code imports from :mod:`asap.attention.dual_map`.
"""

from asap.attention.dual_map import (
    DEFAULT_EXTRA_FEATURES,
    EXTRA_FEATURES,
    ExtendedSliceDualMap,
    build_dual_map,
    extra_query_features,
    num_features,
    set_coefficients,
)

__all__ = [
    "DEFAULT_EXTRA_FEATURES",
    "EXTRA_FEATURES",
    "ExtendedSliceDualMap",
    "build_dual_map",
    "extra_query_features",
    "num_features",
    "set_coefficients",
]
