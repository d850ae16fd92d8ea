"""asap: doubly-stochastic attention — softmax, Sinkhorn, ESP and ASAP.

Train with Sinkhorn, compile to ASAP: the iterative scaling loop is replaced
at inference by exact 1-D slice potentials, a fitted linear map to the
Sinkhorn query dual, and a two-sided entropic c-transform
(Tran, Milkert & Hyde, arXiv 2605.12879).

This namespace holds the attention API. Compiling is in :mod:`asap.compile`:
``asap.compile.compile_model`` for the project's own models, and for any
``nn.Module`` whose attention is Sinkhorn (yours, or a transformers encoder
converted by ``asap.integrations.transformers.convert``)
``asap.compile.compile_module(model, data, forward=...)`` with
``save_compiled_module`` / ``load_compiled_module``.
"""

from asap.attention import (
    OPERATORS,
    AttentionConfig,
    MultiheadAttention,
    asap_attention,
    build_operator,
    esp_attention,
    sinkhorn_attention,
    softmax_attention,
)

__version__ = "0.1.0"

__all__ = [
    "OPERATORS",
    "AttentionConfig",
    "MultiheadAttention",
    "__version__",
    "asap_attention",
    "build_operator",
    "esp_attention",
    "sinkhorn_attention",
    "softmax_attention",
]
