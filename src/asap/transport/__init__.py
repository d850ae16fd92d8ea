"""Transport maths: pure functions, batched over leading dims (``b h``), no modules."""

from asap.transport.ctransform import c_transform_cols, c_transform_cols_tiled, c_transform_rows, column_logsumexp
from asap.transport.diagnostics import attention_column_error, dual_objective, log_plan, marginal_errors
from asap.transport.masks import Support, key_padding_to_attn_mask, support, valid_rows_cols
from asap.transport.sinkhorn import SinkhornIterates, SinkhornResult, center, closure, sinkhorn
from asap.transport.sliced import kantorovich_potentials_1d, project, query_potentials_1d, transport_cost_1d

__all__ = [
    "Support",
    "SinkhornIterates",
    "SinkhornResult",
    "attention_column_error",
    "c_transform_cols",
    "c_transform_cols_tiled",
    "c_transform_rows",
    "center",
    "closure",
    "column_logsumexp",
    "dual_objective",
    "kantorovich_potentials_1d",
    "key_padding_to_attn_mask",
    "log_plan",
    "marginal_errors",
    "project",
    "query_potentials_1d",
    "sinkhorn",
    "support",
    "transport_cost_1d",
    "valid_rows_cols",
]
