"""The training configuration: one dataclass, serialised beside every run."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from asap.attention.module import AttentionConfig

#: Fields that describe *where and how fast* a run executes, not *what* it computes.
#: They may differ when a run is resumed (another data copy, more workers, a
#: different stopping point); every other field must match the checkpoint.
RUNTIME_FIELDS = frozenset(
    {"data_dir", "out_dir", "num_workers", "device", "compile", "checkpoint_every", "stop_after_steps",
     "eval_batch_size", "log_every", "progress"}
)


@dataclass
class TrainConfig:
    """Everything :func:`asap.train.train` needs; saved in the run's ``config.json``.

    Model size comes from ``preset`` ("tiny" | "small" | "base", see
    :data:`asap.models.PRESETS`), overridden field by field by ``dim``,
    ``depth``, ``num_heads``, ``mlp_ratio`` when they are not None. The model
    type follows the data set kind (text -> TextClassifier, image -> ViT).

    Attention: ``method`` is a key of ``asap.attention.OPERATORS``; ``n_iters``
    and ``eps`` are passed to it when set (Sinkhorn needs ``n_iters``: the
    number K of half-steps, odd so that rows are exact), ``attention_options``
    carries any other operator option (e.g. ``{"grad_mode": "unroll"}``).

    Optimisation: AdamW (``lr``, ``weight_decay`` on matrices only, ``betas``),
    linear warm-up over ``warmup_fraction`` of all steps, then cosine decay to
    ``min_lr_ratio * lr``; gradients clipped to norm ``grad_clip`` (None: no clip).
    ``batch_size`` is the *global* batch: with N processes each takes
    ``batch_size / N`` examples, so a run's result does not depend on N.
    The last incomplete batch of each epoch is dropped so that every step has
    the same size on every process.

    Data: ``limit`` caps the number of examples read per split (quick runs);
    ``val_fraction`` of the training split is held out for validation with
    ``seed``; text is cut/padded to ``max_length`` subword tokens of a
    ``vocab_size`` tokenizer trained on the training split only.

    Run control: a checkpoint is written every ``checkpoint_every`` optimiser
    steps (0: only at epoch ends and on interruption); ``stop_after_steps``
    stops (with a checkpoint) once the global step reaches it, leaving a run
    that ``resume`` continues exactly as if it had never stopped.
    """

    dataset: str = "digits"
    data_dir: str | None = None
    out_dir: str = "runs/run"
    # model
    preset: str = "tiny"
    dim: int | None = None
    depth: int | None = None
    num_heads: int | None = None
    mlp_ratio: float | None = None
    dropout: float = 0.0
    pooling: str = "mean"
    patch_size: int | None = None
    # attention
    method: str = "softmax"
    n_iters: int | None = None
    eps: float | None = None
    attention_options: dict[str, Any] = field(default_factory=dict)
    # data
    max_length: int = 256
    vocab_size: int = 8000
    val_fraction: float = 0.1
    limit: int | None = None
    augment: bool = False
    # optimisation
    epochs: int = 3
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_fraction: float = 0.05
    min_lr_ratio: float = 0.0
    grad_clip: float | None = 1.0
    seed: int = 0
    # runtime
    num_workers: int = 0
    device: str = "auto"
    compile: bool = False
    checkpoint_every: int = 0
    stop_after_steps: int | None = None
    eval_batch_size: int | None = None
    log_every: int = 10
    progress: bool = True

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)  # JSON gives a list
        positive = ("epochs", "batch_size", "max_length", "vocab_size", "log_every")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"TrainConfig.{name} must be >= 1, got {getattr(self, name)!r}")
        if self.seed < 0:
            raise ValueError(f"TrainConfig.seed must be >= 0, got {self.seed!r}")
        if self.lr <= 0:
            raise ValueError(f"TrainConfig.lr must be positive, got {self.lr!r}")
        if not 0.0 <= self.warmup_fraction < 1.0:
            raise ValueError(f"TrainConfig.warmup_fraction must be in [0, 1), got {self.warmup_fraction!r}")
        if self.checkpoint_every < 0:
            raise ValueError(f"TrainConfig.checkpoint_every must be >= 0, got {self.checkpoint_every!r}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"TrainConfig.limit must be >= 1 or None, got {self.limit!r}")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"TrainConfig.device must be 'auto', 'cpu' or 'cuda[:i]', got {self.device!r}")

    def attention_config(self) -> AttentionConfig:
        """The :class:`AttentionConfig` of every layer: ``method`` + ``n_iters``/``eps`` (when set) + extra options."""
        options = dict(self.attention_options)
        if self.n_iters is not None:
            options["n_iters"] = self.n_iters
        if self.eps is not None:
            options["eps"] = self.eps
        return AttentionConfig(method=self.method, options=options)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["betas"] = list(self.betas)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"TrainConfig: unknown field(s) {unknown}")
        return cls(**data)

    def differences(self, other: TrainConfig, *, ignore: frozenset[str] = RUNTIME_FIELDS) -> dict[str, tuple[Any, Any]]:
        """``{field: (self value, other value)}`` for every differing field not in ``ignore``."""
        mine, theirs = self.to_dict(), other.to_dict()
        return {k: (mine[k], theirs[k]) for k in mine if k not in ignore and mine[k] != theirs[k]}
