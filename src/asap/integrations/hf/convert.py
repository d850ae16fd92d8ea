"""``convert(model, method, **options)``: run a pretrained transformers encoder's self-attention through asap.

The conversion keeps every pretrained weight and changes only how each
self-attention normalises its scores. It uses transformers' own mechanism for
custom attention: each supported self-attention module receives an asap operator
as the submodule ``asap_operator`` (``(b, h, n, d)`` in, ``(b, h, n, d)`` out, a
boolean query-and-key mask), and the model's ``attn_implementation`` is set to
``"asap"``, whose attention and mask functions
(:mod:`asap.integrations.hf.attention`) call it. No module is replaced; the
query/key/value/output projections stay where they are.

Padding: at real tokens the converted model's outputs do not depend on padding
(padded tokens are neither keys nor queries of any method). At padded positions
the outputs are not the original model's (asap zeroes the attention output of a
padded query); read outputs at real tokens only, as pooling with the attention
mask does.

What is refused, with one line naming the problem: architectures other than
:data:`ARCHITECTURES`, decoders (causal attention), cross attention, pruned
heads, ``output_attentions=True`` for methods other than softmax (at run time),
and method options the method does not take.
"""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass
from typing import Any

from torch import nn
from transformers import PreTrainedModel

from asap.attention import OPERATORS, AttentionConfig, AttentionOperator, build_operator
from asap.attention.submodules import find_modules, replace_module
from asap.errors import ConfigError
from asap.integrations.hf.attention import ATTN_IMPLEMENTATION, OPERATOR_ATTR, UnsupportedModelError, register

#: The attribute of a converted model holding its :class:`~asap.attention.AttentionConfig`.
CONVERSION_ATTR = "asap_attention"


@dataclass(frozen=True)
class Architecture:
    """Where a supported architecture keeps its self-attention, and what it is called there.

    ``attention`` is the class (in the transformers module ``module``) of the
    self-attention that calls the attention interface; ``heads`` / ``head_dim`` /
    ``query`` name its head count, head size and query projection;
    ``task`` is ``"text"`` or ``"image"`` (which classifier wraps it).
    """

    module: str
    attention: str
    heads: str
    head_dim: str
    query: str
    task: str

    def attention_class(self) -> type[nn.Module]:
        return getattr(importlib.import_module(self.module), self.attention)


#: Supported ``config.model_type`` s (MiniLM checkpoints are ``bert``).
ARCHITECTURES: dict[str, Architecture] = {
    "bert": Architecture(
        "transformers.models.bert.modeling_bert", "BertSelfAttention", "num_attention_heads", "attention_head_size",
        "query", "text",
    ),
    "roberta": Architecture(
        "transformers.models.roberta.modeling_roberta", "RobertaSelfAttention", "num_attention_heads",
        "attention_head_size", "query", "text",
    ),
    "distilbert": Architecture(
        "transformers.models.distilbert.modeling_distilbert", "DistilBertSelfAttention", "n_heads",
        "attention_head_size", "q_lin", "text",
    ),
    "vit": Architecture("transformers.models.vit.modeling_vit", "ViTAttention", "num_attention_heads", "head_dim",
                        "q_proj", "image"),
}  # fmt: skip


def architecture(config: Any) -> Architecture:
    """The :class:`Architecture` of a transformers config, or a one-line refusal."""
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise UnsupportedModelError(
            f"model type {model_type!r} is not supported by asap attention; supported: {sorted(ARCHITECTURES)}"
        )
    return ARCHITECTURES[model_type]


def check_encoder(config: Any) -> None:
    """Refuse what asap attention cannot run exactly: decoders, cross attention, pruned heads."""
    if getattr(config, "is_decoder", False) or getattr(config, "is_encoder_decoder", False):
        raise UnsupportedModelError(
            "causal (decoder) models are not supported: exact doubly-stochastic causal attention does not exist "
            "(METHOD.md sec. 6); convert an encoder (is_decoder=False)"
        )
    if getattr(config, "add_cross_attention", False):
        raise UnsupportedModelError("cross attention is not supported by asap attention (add_cross_attention=True)")
    if getattr(config, "pruned_heads", None):
        raise UnsupportedModelError(f"models with pruned heads are not supported (pruned_heads={config.pruned_heads})")


def attention_modules(model: nn.Module, arch: Architecture) -> list[tuple[str, nn.Module, int, int]]:
    """``(name, module, num_heads, head_dim)`` of every self-attention of ``arch`` in ``model``, in order."""
    cls = arch.attention_class()
    found = []
    candidates = find_modules(model, lambda name, module: isinstance(module, cls) or (
        "crossattention" in type(module).__name__.lower()))  # fmt: skip
    for name, module in ((c.name, c.module) for c in candidates):
        if isinstance(module, cls):
            heads, head_dim = int(getattr(module, arch.heads)), int(getattr(module, arch.head_dim))
            query = getattr(module, arch.query)
            if query.out_features != heads * head_dim:
                raise UnsupportedModelError(
                    f"{name}: its query projection has {query.out_features} outputs, not {heads} heads x {head_dim} "
                    "(pruned heads are not supported)"
                )
            found.append((name, module, heads, head_dim))
        elif "crossattention" in type(module).__name__.lower():
            raise UnsupportedModelError(f"{name}: cross attention ({type(module).__name__}) is not supported")
    if not found:
        raise UnsupportedModelError(f"{type(model).__name__} has no {arch.attention} module to convert")
    return found


def _build(method: str, options: dict[str, Any], *, num_heads: int, head_dim: int, scale: float) -> AttentionOperator:
    try:
        return build_operator(method, num_heads=num_heads, head_dim=head_dim, scale=scale, **options)
    except TypeError as err:  # build_operator's refusal of options the method does not take
        raise ConfigError(str(err)) from None


def convert(model: PreTrainedModel, method: str, **options: Any) -> PreTrainedModel:
    """Convert a loaded transformers encoder in place to asap attention; return it.

    Args:
        model: a BERT / MiniLM / RoBERTa / DistilBERT / ViT model of transformers
            (a base model or one with a task head: ``BertModel``,
            ``BertForSequenceClassification``, ``ViTForImageClassification``, ...).
        method: ``"softmax" | "sinkhorn" | "esp" | "asap"``.
        **options: the method's own options (``n_iters``, ``eps``, ``grad_mode``
            for Sinkhorn, ...); an option the method does not take is a
            :class:`~asap.errors.ConfigError` (a ``ValueError``). ``scale`` is
            not an option: each operator takes its module's ``scaling``.

    After the call, each self-attention module ``m`` has ``m.asap_operator`` (a
    :class:`~asap.attention.AttentionOperator` on the module's device),
    ``model.config._attn_implementation == "asap"``, and ``model.asap_attention``
    is the :class:`~asap.attention.AttentionConfig` (method and options) that
    :func:`~asap.integrations.hf.io.save_converted` records. The model is inputs
    and outputs as before: ``model(input_ids, attention_mask=...)`` with the
    usual 2-D padding mask (True / 1 = real token). With ``method="softmax"``
    it reproduces the original outputs to rounding (at real tokens).
    Converting an already converted model replaces its operators.

    Attention-probability dropout is not applied (by any method; see
    :func:`~asap.integrations.hf.attention.asap_attention_forward`); hidden
    dropout is unchanged.
    """
    if not isinstance(model, PreTrainedModel):
        raise ConfigError(f"convert needs a transformers PreTrainedModel, got {type(model).__name__}")
    if method not in OPERATORS:
        raise ConfigError(f"unknown attention method {method!r}; choose one of {sorted(OPERATORS)}")
    if "scale" in options:
        raise ConfigError("scale is not an option of convert: each operator takes its attention module's scaling")
    arch = architecture(model.config)
    check_encoder(model.config)
    if method != "softmax" and getattr(model.config, "output_attentions", False):
        raise UnsupportedModelError(f"config.output_attentions=True: the {method!r} operator returns no weights")
    modules = attention_modules(model, arch)
    # Build every operator before touching the model, so a refused option leaves it unchanged.
    built = []
    for _name, module, heads, head_dim in modules:
        scale = float(getattr(module, "scaling", head_dim**-0.5))
        if not math.isfinite(scale) or scale <= 0:
            raise UnsupportedModelError(f"{type(module).__name__}: attention scaling {scale} is not a positive number")
        operator = _build(method, dict(options), num_heads=heads, head_dim=head_dim, scale=scale)
        reference = next(module.parameters(), None)
        built.append((module, operator if reference is None else operator.to(reference.device)))
    register()
    model.set_attn_implementation(ATTN_IMPLEMENTATION)
    if model.config._attn_implementation != ATTN_IMPLEMENTATION:
        raise UnsupportedModelError(
            f"{type(model).__name__} does not let transformers set its attention implementation to "
            f"{ATTN_IMPLEMENTATION!r} (it does not dispatch through AttentionInterface)"
        )
    for module, operator in built:  # a registered submodule: moved, saved and compiled with the model
        replace_module(module, OPERATOR_ATTR, operator, create=True)
    setattr(model, CONVERSION_ATTR, AttentionConfig(method=method, options=dict(options)))
    return model


def converted_operators(model: nn.Module) -> list[tuple[str, AttentionOperator]]:
    """``(module name, operator)`` of every converted attention of ``model`` (after compile, its ASAP operators)."""
    holders = find_modules(model, lambda name, module: isinstance(module._modules.get(OPERATOR_ATTR), nn.Module))
    return [(found.name, getattr(found.module, OPERATOR_ATTR)) for found in holders]


def conversion(model: nn.Module) -> AttentionConfig:
    """The :class:`~asap.attention.AttentionConfig` ``model`` was converted with, or a refusal if it was not."""
    config = getattr(model, CONVERSION_ATTR, None)
    if not isinstance(config, AttentionConfig):
        raise ConfigError(
            f"{type(model).__name__} was not converted: call asap.integrations.transformers.convert(model, method) first"
        )
    return config


__all__ = [
    "ARCHITECTURES",
    "Architecture",
    "architecture",
    "attention_modules",
    "check_encoder",
    "conversion",
    "converted_operators",
    "convert",
]
