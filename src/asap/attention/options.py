"""Typed options of the attention operators: frozen, validated once, JSON round-tripping.

Each operator of the method switch has one options class; an operator built
with keyword options validates them here, keeps the object as ``.options``,
and :func:`operator_config` turns any operator back into the
:class:`~asap.attention.module.AttentionConfig` that rebuilds it (for a
compiled layer: ``method="asap"`` with the dual map's slices, seed and
features; the fitted coefficients are in the state dict)::

    opts = AsapOptions(eps=1.0, num_slices=16, extra_features=("qk_mean", "q_norm"))
    AsapOptions.from_dict(opts.to_dict()) == opts        # True
    AsapOptions(num_slices=0)                            # ValueError naming num_slices
    AsapOptions(map_kind="relu", map_options={"depth": 3})   # the ReLU dual map of depth 3
    AsapOptions(map_options={"depth": 3})                # ValueError: the linear map takes no option
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, ClassVar, Literal

from asap.attention.checks import check_int, check_positive
from asap.attention.dual_map import DUAL_MAPS, SLICE_TYPES, _check_extra_features, dual_map_class
from asap.transport.ctransform import DEFAULT_TILE_BYTES
from asap.transport.sliced_plans import SLICE_COSTS, SliceCost, SortDistance

#: Sinkhorn's gradient modes (see :func:`asap.attention.functional.sinkhorn_attention`).
GRAD_MODES: tuple[str, ...] = ("unroll", "closure")
#: The ways :func:`asap.attention.functional.asap_attention` can compute the closure.
ASAP_BACKENDS: tuple[str, ...] = ("auto", "flash", "shared", "native", "triton")


class OperatorOptions:
    """Shared behaviour: ``to_dict`` / ``from_dict`` (unknown keys refused by name)."""

    method: ClassVar[str]

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)  # type: ignore[call-overload]
        return {key: list(value) if isinstance(value, tuple) else value for key, value in out.items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "OperatorOptions":
        if not isinstance(data, dict):
            raise TypeError(f"{cls.method} options must be a dict, got {type(data).__name__}")
        names = {f.name for f in fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(data) - names)
        if unknown:
            raise TypeError(f"method {cls.method!r} does not take option(s) {unknown}; its options are {sorted(names)}")
        return cls(**{key: tuple(value) if isinstance(value, list) else value for key, value in data.items()})


def _scale(method: str, scale: float | None) -> float | None:
    return None if scale is None else check_positive(f"{method}: scale", scale)


@dataclass(frozen=True)
class SoftmaxOptions(OperatorOptions):
    method: ClassVar[str] = "softmax"
    scale: float | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "scale", _scale("softmax", self.scale))


@dataclass(frozen=True)
class SinkhornOptions(OperatorOptions):
    method: ClassVar[str] = "sinkhorn"
    n_iters: int = 3
    eps: float = 1.0
    grad_mode: str = "unroll"
    scale: float | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "n_iters", check_int("sinkhorn: n_iters", self.n_iters, minimum=1))
        object.__setattr__(self, "eps", check_positive("eps", self.eps))
        if self.grad_mode not in GRAD_MODES:
            raise ValueError(f"sinkhorn: grad_mode must be one of {GRAD_MODES}, got {self.grad_mode!r}")
        object.__setattr__(self, "scale", _scale("sinkhorn", self.scale))


@dataclass(frozen=True)
class AsapOptions(OperatorOptions):
    """The compiled operator: ``eps``/``scale`` (the teacher's), the dual map, warm-start steps and backend.

    The dual map is ``map_kind`` (a family of :data:`~asap.attention.dual_map.DUAL_MAPS`:
    ``"linear"``, ``"relu"``, ``"mlp"``) with ``map_options``, the kind's own
    structural options (``relu``: ``depth``, ``num_stacks``; ``mlp``:
    ``hidden``; ``linear``: none), stored with every default filled in; an
    option the kind does not take is refused. ``to_dict`` leaves out an empty
    ``map_options`` (a linear operator's record is what it always was).
    """

    method: ClassVar[str] = "asap"
    eps: float = 1.0
    num_slices: int = 16
    slice_type: str = "random"
    seed: int = 0
    extra_features: tuple[str, ...] = ()
    map_kind: str = "linear"
    extra_steps: int = 0
    backend: str = "auto"
    tile_bytes: int = DEFAULT_TILE_BYTES
    scale: float | None = None
    map_options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "eps", check_positive("eps", self.eps))
        object.__setattr__(self, "num_slices", check_int("asap: num_slices", self.num_slices, minimum=1))
        if self.slice_type not in SLICE_TYPES:
            raise ValueError(f"asap: slice_type must be one of {SLICE_TYPES}, got {self.slice_type!r}")
        object.__setattr__(self, "seed", check_int("asap: seed", self.seed, minimum=0))
        object.__setattr__(self, "extra_features", _check_extra_features(tuple(self.extra_features)))
        if self.map_kind not in DUAL_MAPS:
            raise ValueError(f"asap: map_kind must be one of {sorted(DUAL_MAPS)}, got {self.map_kind!r}")
        object.__setattr__(self, "map_options", dual_map_class(self.map_kind).check_options(self.map_options))
        object.__setattr__(self, "extra_steps", check_int("asap: extra_steps", self.extra_steps, minimum=0))
        if self.backend not in ASAP_BACKENDS:
            raise ValueError(f"asap: backend must be one of {ASAP_BACKENDS}, got {self.backend!r}")
        object.__setattr__(self, "tile_bytes", check_int("asap: tile_bytes", self.tile_bytes, minimum=1))
        object.__setattr__(self, "scale", _scale("asap", self.scale))

    def __hash__(self) -> int:  # the options dict is not hashable; its sorted items are
        values = tuple(tuple(sorted(v.items())) if isinstance(v, dict) else v for v in asdict(self).values())
        return hash(values)

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        if not out["map_options"]:
            del out["map_options"]
        return out


# ---------------------------------------------------------------------------------------------------- ESP

Normalize = Literal["row", "marginal"]
NORMALIZE_MODES: tuple[str, ...] = ("row", "marginal")


@dataclass(frozen=True)
class EspConventions:
    """ESP's choices that the published code leaves open, resolved once (see :mod:`asap.attention.esp`).

    cost: slice cost; sort_distance: SoftSort distance; points_scale_power: the
    points are ``scale ** power * q`` (``0.5`` by default, ``1`` published);
    cost_per_token: weight slices by ``n_valid <pi_l, C>`` instead of ``<pi_l, C>``;
    normalize: ``"row"`` (divide by the row sums of the mixed plan) or
    ``"marginal"`` (divide by ``a = 1/n_valid``).
    """

    cost: SliceCost = "dot"
    sort_distance: SortDistance = "abs"
    points_scale_power: float = 0.5
    cost_per_token: bool = False
    normalize: Normalize = "row"

    @classmethod
    def resolve(cls, *, cost: str | None, normalize: str | None, published: bool) -> EspConventions:
        base = PUBLISHED_CONVENTIONS if published else cls()
        cost = base.cost if cost is None else cost
        normalize = base.normalize if normalize is None else normalize
        if cost not in SLICE_COSTS:
            raise ValueError(f"esp attention: cost must be one of {SLICE_COSTS}, got {cost!r}")
        if normalize not in NORMALIZE_MODES:
            raise ValueError(f"esp attention: normalize must be one of {NORMALIZE_MODES}, got {normalize!r}")
        return cls(cost, base.sort_distance, base.points_scale_power, base.cost_per_token, normalize)


# ESPFormer's published code (attentions/esp.py): q and k scaled by 1/sqrt(d) each, torch.cdist (p=2) cost
# summed over plans of mass n, SoftSort_p2 (squared distance), attention = plan of mass n (rows sum to 1).
PUBLISHED_CONVENTIONS = EspConventions(
    cost="euclidean", sort_distance="squared", points_scale_power=1.0, cost_per_token=True, normalize="marginal"
)
