"""Implementation of :mod:`asap.integrations.transformers` (import the public names from there).

* :mod:`~asap.integrations.hf.attention`: the attention and mask functions
  registered with transformers under ``attn_implementation="asap"``;
* :mod:`~asap.integrations.hf.convert`: the supported architectures and
  :func:`convert`;
* :mod:`~asap.integrations.hf.io`: saving, loading, local pretrained
  classifiers and tokenizers.
"""

try:
    import transformers  # noqa: F401
except ImportError as err:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "asap.integrations.transformers needs the `transformers` package: pip install 'asap-attention[hf]'"
    ) from err
