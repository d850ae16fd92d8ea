"""Attention operators (functions), their references, and the module with the method switch."""

from asap.attention.checks import validate_attention_inputs
from asap.attention.dual_map import SliceDualMap, make_directions, slice_potentials
from asap.attention.functional import asap_attention, sinkhorn_attention, softmax_attention
from asap.attention.module import AttentionConfig, MultiheadAttention, available_methods
from asap.attention.operators import (
    OPERATORS,
    AsapOperator,
    AttentionOperator,
    SinkhornOperator,
    SoftmaxOperator,
    build_operator,
    register_operator,
)
from asap.attention.esp import EspOperator, esp_attention, esp_attention_reference

# esp.py builds on operators.py, so it registers itself here rather than in OPERATORS' literal.
register_operator(EspOperator)

__all__ = [
    "OPERATORS",
    "AsapOperator",
    "AttentionConfig",
    "AttentionOperator",
    "EspOperator",
    "MultiheadAttention",
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
