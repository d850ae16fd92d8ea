"""Attention operators (functions), their references, and the module with the method switch."""

from asap.attention.checks import validate_attention_inputs
from asap.attention.dual_map import DUAL_MAPS, DualMap, SliceDualMap, make_directions, register_dual_map, slice_potentials
from asap.attention.esp import esp_attention
from asap.attention.functional import asap_attention, sinkhorn_attention, softmax_attention
from asap.attention.module import AttentionConfig, MultiheadAttention, available_methods
from asap.attention.operators import (
    OPERATORS,
    AsapOperator,
    AttentionOperator,
    EspOperator,
    SinkhornOperator,
    SoftmaxOperator,
    build_operator,
    register_operator,
)
from asap.attention.nonlinear_maps import MlpDualMap, ReluDualMap
from asap.attention.reference import esp_attention_reference

# The nonlinear dual maps build on dual_map.py: registered here, before any asap.attention module is used.
register_dual_map(ReluDualMap)
register_dual_map(MlpDualMap)

__all__ = [
    "DUAL_MAPS",
    "OPERATORS",
    "AsapOperator",
    "AttentionConfig",
    "AttentionOperator",
    "DualMap",
    "EspOperator",
    "MlpDualMap",
    "MultiheadAttention",
    "ReluDualMap",
    "SinkhornOperator",
    "SliceDualMap",
    "SoftmaxOperator",
    "asap_attention",
    "available_methods",
    "build_operator",
    "esp_attention",
    "esp_attention_reference",
    "make_directions",
    "register_operator",
    "sinkhorn_attention",
    "slice_potentials",
    "softmax_attention",
    "validate_attention_inputs",
]
