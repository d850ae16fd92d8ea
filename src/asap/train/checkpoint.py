"""Checkpoints without pickle: safetensors for every tensor, JSON for the rest.

This module gathers, under the import path every caller uses, the three parts
of a run's files, each in its own module:

* :mod:`asap.train.layout`: the run directory's file names, ``FORMAT_VERSION``,
  :class:`CheckpointError`;
* :mod:`asap.train.tensor_io`: weights files (safetensors) with a content hash
  recorded in their header, and their checks (finite, same names/shapes/dtypes
  as a model);
* :mod:`asap.train.resume_state`: the one-file resumable state
  (``checkpoint.safetensors``: weights, optimiser, schedule, RNG streams, progress);
* :mod:`asap.train.run_config`: a run's ``config.json`` (:class:`RunConfig`, its
  schema), ``model.safetensors`` and :func:`load_model`.
"""

from __future__ import annotations

from asap.train.layout import (
    CHECKPOINT_FILE,
    CONFIG_FILE,
    FORMAT_VERSION,
    LOCK_FILE,
    METRICS_FILE,
    MODEL_FILE,
    PRETRAINED_TOKENIZER,
    SUBWORD_TOKENIZER,
    TOKENIZER_FILE,
    TOKENIZER_TYPES,
    CheckpointError,
)
from asap.train.resume_state import (
    ResumeState,
    capture_rng_state,
    flatten_optimizer_state,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
    unflatten_optimizer_state,
)
from asap.train.run_config import (
    MAX_MODEL_SIZES,
    RunConfig,
    _validate_model_dict,
    library_versions,
    load_model,
    model_config_dict,
    read_json_file,
    read_run_config,
    save_model,
    validate_run_config,
    write_run_config,
)
from asap.train.tensor_io import (
    HASH_KEY,
    check_finite,
    check_shapes,
    check_state_dict,
    load_tensors,
    read_header,
    save_tensors,
    tensors_sha256,
)

__all__ = [
    "CHECKPOINT_FILE",
    "CONFIG_FILE",
    "FORMAT_VERSION",
    "HASH_KEY",
    "LOCK_FILE",
    "MAX_MODEL_SIZES",
    "METRICS_FILE",
    "MODEL_FILE",
    "PRETRAINED_TOKENIZER",
    "SUBWORD_TOKENIZER",
    "TOKENIZER_FILE",
    "TOKENIZER_TYPES",
    "CheckpointError",
    "ResumeState",
    "RunConfig",
    "_validate_model_dict",
    "capture_rng_state",
    "check_finite",
    "check_shapes",
    "check_state_dict",
    "flatten_optimizer_state",
    "library_versions",
    "load_checkpoint",
    "load_model",
    "load_tensors",
    "model_config_dict",
    "read_header",
    "read_json_file",
    "read_run_config",
    "restore_rng_state",
    "save_checkpoint",
    "save_model",
    "save_tensors",
    "tensors_sha256",
    "unflatten_optimizer_state",
    "validate_run_config",
    "write_run_config",
]
