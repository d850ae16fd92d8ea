"""Adapters that run asap attention inside other libraries' models.

* :mod:`asap.integrations.transformers`: pretrained Hugging Face encoders (BERT,
  MiniLM, DistilBERT, RoBERTa, ViT) converted in place to softmax, Sinkhorn,
  ESP or ASAP attention; needs the optional extra ``asap-attention[hf]``.
  :mod:`asap.integrations.hf.classifier` makes such an encoder with a
  classification head a model of the training loop (``asap train --model hf:PATH``).

Nothing here is imported by ``import asap``: each adapter imports its library
only when it is itself imported. :func:`provide_model_type` imports the adapter
that defines a model type a saved run names.
"""

from __future__ import annotations

import importlib

from asap.errors import ConfigError

#: Model types defined by an adapter: ``model_type`` -> the module that registers it with :mod:`asap.models`.
MODEL_TYPES = {"hf_classifier": ("asap.integrations.hf.classifier", "hf")}


def provide_model_type(model_type: object) -> None:
    """Make sure the adapter defining ``model_type`` is imported (registered); nothing for other types.

    Raises :class:`~asap.errors.ConfigError` when the adapter's optional extra is not installed.
    """
    entry = MODEL_TYPES.get(model_type) if isinstance(model_type, str) else None
    if entry is None:
        return
    module, extra = entry
    try:
        importlib.import_module(module)
    except ImportError as err:
        raise ConfigError(
            f"model type {model_type!r} needs the optional extra: pip install 'asap-attention[{extra}]' ({err})"
        ) from None
