"""Adapters that run asap attention inside other libraries' models.

* :mod:`asap.integrations.transformers`: pretrained Hugging Face encoders (BERT,
  MiniLM, DistilBERT, RoBERTa, ViT) converted in place to softmax, Sinkhorn,
  ESP or ASAP attention; needs the optional extra ``asap-attention[hf]``.

Nothing here is imported by ``import asap``: each adapter imports its library
only when it is itself imported.
"""
