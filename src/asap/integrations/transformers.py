"""Pretrained Hugging Face encoders with doubly-stochastic attention (optional extra ``asap-attention[hf]``).

Convert a loaded transformers encoder in place, keeping every pretrained weight::

    from transformers import AutoModel
    from asap.integrations.transformers import convert, save_converted, load_converted

    model = AutoModel.from_pretrained(folder, local_files_only=True)
    convert(model, "sinkhorn", n_iters=11, eps=1.0)   # or "softmax" | "esp" | "asap"
    out = model(input_ids=ids, attention_mask=padding)  # padding (b, n): 1 / True = real token
    save_converted(model, "converted/")                # config.json + asap_attention.json + model.safetensors
    model = load_converted("converted/")

Supported: BERT (and MiniLM, a BERT), RoBERTa, DistilBERT and ViT, as base models or
with their task heads. Each self-attention module gets its asap operator as the
submodule ``asap_operator`` and the model's ``attn_implementation`` becomes
``"asap"`` (transformers' AttentionInterface and mask interface; see
:mod:`asap.integrations.hf.attention` for the two padding traps this avoids).
``asap.compile.compile_model`` finds the Sinkhorn operators there by type and swaps
them for ASAP operators.

Masks: the usual 2-D padding mask. Padded tokens are excluded as keys *and* as
queries, so the outputs at real tokens do not depend on padding; the outputs at
padded positions are not meaningful (read real tokens only, as masked pooling does).

For fine-tuning, :func:`load_pretrained_classifier` loads a local checkpoint with a
fresh classification head and converts it, and :func:`load_tokenizer` loads its
tokenizer; both read local folders only (nothing is downloaded).
:class:`HFClassifier` (built from :func:`classifier_config`) wraps such a classifier
as a model of asap's own training loop, which is what ``asap train --model hf:PATH``
fine-tunes; :func:`pretrained_tokenizer` gives the tokenizer a run keeps.
"""

from asap.integrations.hf.attention import (
    ATTN_IMPLEMENTATION,
    OPERATOR_ATTR,
    UnsupportedModelError,
    asap_attention_forward,
    asap_mask,
    register,
)
from asap.integrations.hf.classifier import HFClassifier, HFClassifierConfig, classifier_config
from asap.integrations.hf.convert import ARCHITECTURES, conversion, converted_operators, convert
from asap.integrations.hf.io import (
    load_converted,
    load_pretrained_classifier,
    load_tokenizer,
    local_folder,
    pretrained_tokenizer,
    save_converted,
)

__all__ = [
    "ARCHITECTURES",
    "ATTN_IMPLEMENTATION",
    "HFClassifier",
    "HFClassifierConfig",
    "OPERATOR_ATTR",
    "UnsupportedModelError",
    "asap_attention_forward",
    "asap_mask",
    "classifier_config",
    "conversion",
    "converted_operators",
    "convert",
    "load_converted",
    "load_pretrained_classifier",
    "load_tokenizer",
    "local_folder",
    "pretrained_tokenizer",
    "register",
    "save_converted",
]
