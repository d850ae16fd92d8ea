"""The layout of a run directory: its file names, format version, and the error for a run that cannot be used.

A run directory holds

    config.json              model + train + data description, format and library versions
                             (:mod:`asap.train.run_config`)
    model.safetensors        the model weights (all the compile stage and ``asap eval`` need)
    checkpoint.safetensors   everything ``--resume`` needs, in ONE file so that it is
                             always self-consistent (:mod:`asap.train.resume_state`)
    metrics.jsonl, tokenizer.json, eval_<split>.json, command.txt, .lock

Every write is atomic and every JSON strict (:mod:`asap.io`); weights files are
safetensors (:mod:`asap.train.tensor_io`); ``torch.load`` (pickle) is never used.
"""

from __future__ import annotations

from asap.errors import AsapError

#: Version of the run-directory layout; bump on incompatible changes.
FORMAT_VERSION = 1

CONFIG_FILE = "config.json"
MODEL_FILE = "model.safetensors"
CHECKPOINT_FILE = "checkpoint.safetensors"
METRICS_FILE = "metrics.jsonl"
TOKENIZER_FILE = "tokenizer.json"
#: ``data.tokenizer_type`` of a text run: its own trained subword tokenizer, or a pretrained model's.
SUBWORD_TOKENIZER, PRETRAINED_TOKENIZER = "subword", "pretrained"
TOKENIZER_TYPES = (SUBWORD_TOKENIZER, PRETRAINED_TOKENIZER)
LOCK_FILE = ".lock"


class CheckpointError(AsapError, RuntimeError):
    """A checkpoint or run directory that cannot be used; the message names the file and the problem."""
