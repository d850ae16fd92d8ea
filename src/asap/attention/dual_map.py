"""The ASAP dual map: predicted Sinkhorn query dual from exact 1-D slice potentials.

For each head, ``L`` fixed unit directions ``theta_l`` define slices. Per token
the features are the exact 1-D Kantorovich query potentials ``phi_l(i)``
(:func:`asap.transport.sliced.kantorovich_potentials_1d`), optionally followed
by ``E`` cheap per-token extras, and the map is linear (docs/method.md sec. 4.3)::

    f_hat_i = sum_l alpha_{h,l} phi_l(i) + sum_e beta_{h,e} x_e(i),   centred over valid queries.

The first two extras cost ``O(n d)`` (no ``n x m`` work, no extra sort), the other two a matrix product:

* ``"qk_mean"``: ``scale <q_i, mean_j k_j>`` (mean over valid keys): the
  first-order term of the row log-sum-exp that the query dual undoes
  (``-eps LSE_j((S_ij + g_j)/eps) ~ -mean_j S_ij - ...``);
* ``"q_norm"``: ``scale^2 |q_i|^2``: the isotropic part of the second-order
  (variance) term ``scale^2 q_i^T Cov(k) q_i / (2 eps)``;
* ``"lse_landmarks"``: ``log mean_t exp(scale <q_i, k_{j_t}>)`` over
  :data:`NUM_LANDMARKS` landmark keys evenly spaced over the valid keys, the
  first and the last included (``[CLS]`` and ``[SEP]`` in a BERT-style encoder,
  where attention sinks sit): a cheap sample of the row normaliser that the
  two moment features above only expand to second order. ``O(n M d)``, no sort;
* ``"lse_keys"``: ``log mean_j exp(scale <q_i, k_j>)`` over every valid key, the
  row normaliser itself (at ``eps = 1``, minus the query dual of Sinkhorn's
  first half-step): the landmark feature with every key a landmark. Not cheap:
  ``O(n m d)``, one matrix product and one exponential per score, the cost of
  a Sinkhorn half-step, counted in the operator's measured time like the
  rest. It is there because it carries most of what the map misses on sharp
  attention (results/fidelity: MiniLM).

A slice potential carries the linear term only through
``<theta, q_i> <theta, kbar>``, so L random directions represent it only if
``sum_l alpha_l theta_l theta_l^T`` is close to the identity; the measurements
that made both extras the default of ``asap compile`` are in
``results/compile/*/ablation_features``.

Two ways to evaluate the same map:

* :meth:`SliceDualMap.features` builds the design matrix ``(b, h, L + E, n)``
  (every column centred): what calibration fits on, and the reference.
* :meth:`SliceDualMap.forward` is the inference path for self-attention
  (``n = m``, no mask or a token padding mask): the coefficients are folded
  into the slice steps before the cumulative sum, one ``scatter_add_`` writes
  ``f_hat`` directly (no ``(b, h, L, n)`` feature tensor), only the query
  projections are argsorted (keys need sorted values only), and the per-slice
  centrings are skipped (a constant per ``(b, h)`` cancels exactly in the
  c-transform; ``center=True`` restores the reference's output). Anything else
  (cross-attention, general masks) goes through :meth:`features`.

The directions and coefficients are *buffers*, not parameters: they are fitted
by ``asap compile`` (ridge least squares, then optionally KL refinement), not
by gradient descent of the host model, and they save and load with the model's
state dict.

**The family** (:data:`DUAL_MAPS`, by the ``map_kind`` an operator's options
name). Every kind is a :class:`DualMap`: the same slices and extras give the
same per-token inputs ``x (b, h, F, n)``, ``F = L + E`` (:meth:`DualMap.features`),
and a kind is a function of them, per head::

    f_hat_i = center( m_h(x(i)) ),       m_h: R^F -> R,

``"linear"`` (:class:`SliceDualMap`, the default, above), ``"relu"`` (per-slice
triangle-wave ReLU networks plus the linear term) and ``"mlp"`` (a small MLP
with a linear skip), the latter two in :mod:`asap.attention.nonlinear_maps`.
The interface every kind offers: ``features`` (the inputs, fit-ready for the
linear term), ``predict(x, valid=...)`` (``f_hat`` from them, centred),
``set_coefficients(coef (h, F))`` (the linear term; a richer kind's nonlinear
part is zero after it, so it then *is* that linear map: the fit's starting
point), ``forward(q, k, ...)``, the buffers ``directions``, ``seed`` and
``fitted``, and ``map_options`` (the kind's structural options, validated by
:meth:`DualMap.check_options`; the linear map has none).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn

from asap.attention import native
from asap.transport.masks import valid_rows_cols
from asap.transport.sinkhorn import center as center_over
from asap.transport.sliced import argsort_and_sort_last, project, query_potentials_1d

SliceType = Literal["random", "axis"]
SLICE_TYPES: tuple[str, ...] = ("random", "axis")
EXTRA_FEATURES: tuple[str, ...] = ("qk_mean", "q_norm", "lse_landmarks", "lse_keys")
#: The extras that need a matrix product of queries and keys: the map-only kernels take the moment extras
#: only, the one-call CPU kernel forms ``lse_keys`` from its closure's scores (``c_lse``).
PRODUCT_FEATURES: tuple[str, ...] = ("lse_landmarks", "lse_keys")
#: Landmark keys of the ``"lse_landmarks"`` extra feature.
NUM_LANDMARKS = 8
#: The default of ``asap compile``: both, chosen by the ablations in ``results/compile/*/ablation_features``.
DEFAULT_EXTRA_FEATURES: tuple[str, ...] = ("qk_mean", "q_norm")


def make_directions(*, num_heads: int, head_dim: int, num_slices: int, slice_type: SliceType, seed: int) -> Tensor:
    """Unit slice directions ``(h, L, d)``.

    ``"random"``: i.i.d. Gaussian directions normalised to the sphere, drawn
    from a ``torch.Generator`` seeded with ``seed`` (independent per head), so
    they are reproducible from the stored seed. ``"axis"``: ``L <= d``
    coordinate axes, evenly spaced over ``0..d-1`` (all of them when ``L = d``).
    """
    if num_slices < 1:
        raise ValueError(f"num_slices must be >= 1, got {num_slices}")
    if slice_type == "random":
        gen = torch.Generator().manual_seed(seed)
        dirs = torch.randn(num_heads, num_slices, head_dim, generator=gen, dtype=torch.float64)
        return (dirs / dirs.norm(dim=-1, keepdim=True)).to(torch.float32)
    if slice_type == "axis":
        if num_slices > head_dim:
            raise ValueError(f"axis slices: num_slices ({num_slices}) cannot exceed head_dim ({head_dim})")
        axes = torch.linspace(0, head_dim - 1, num_slices).round().long()
        eye = torch.eye(head_dim)[axes]  # (L, d)
        return eye.unsqueeze(0).expand(num_heads, -1, -1).clone()
    raise ValueError(f"slice_type must be one of {SLICE_TYPES}, got {slice_type!r}")


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def slice_potentials(q: Tensor, k: Tensor, directions: Tensor, *, scale: float, attn_mask: Tensor | None) -> Tensor:
    """Query-side 1-D potentials ``phi (b, h, L, n)`` in fp32 (fp64 for fp64 inputs)."""
    rows, cols = valid_rows_cols(attn_mask, q.shape[-2], k.shape[-2])
    return _slice_potentials(q, k, directions, scale=scale, rows=rows, cols=cols)


def _slice_potentials(q: Tensor, k: Tensor, directions: Tensor, *, scale: float, rows: Tensor | None,
                      cols: Tensor | None) -> Tensor:  # fmt: skip
    """:func:`slice_potentials` from valid queries ``rows (..., n)`` and keys ``cols (..., m)`` (None: all valid)."""
    dtype = _work_dtype(q.dtype)
    x, y = project(q.to(dtype), k.to(dtype), directions.to(dtype), scale=scale)
    if rows is not None:
        rows = rows.expand(*q.shape[:-1])
        cols = cols.expand(*k.shape[:-1])
    return query_potentials_1d(x, y, x_valid=rows, y_valid=cols)


def _check_extra_features(names: tuple[str, ...]) -> tuple[str, ...]:
    names = tuple(names)
    unknown = sorted(set(names) - set(EXTRA_FEATURES))
    if unknown:
        raise ValueError(f"unknown extra feature(s) {unknown}; choose from {EXTRA_FEATURES}")
    if len(set(names)) != len(names):
        raise ValueError(f"extra features must be distinct, got {names}")
    return names


def _valid_key_mean(k: Tensor, cols: Tensor | None) -> Tensor:
    """``mean_j k_j`` over valid keys: ``(b, h, d)``; ``cols`` broadcasts to ``(b, h, m)``."""
    if cols is None:
        return k.mean(dim=-2)
    w = cols.expand(*k.shape[:-1]).to(k.dtype).unsqueeze(-1)
    return (k * w).sum(dim=-2) / w.sum(dim=-2).clamp(min=1)


def _landmark_lse(q: Tensor, k: Tensor, *, scale: float, cols: Tensor | None) -> Tensor:
    """``log mean_t exp(scale <q_i, k_{j_t}>)`` over :data:`NUM_LANDMARKS` evenly spaced valid keys: ``(b, h, n)``.

    The landmarks of a row are its valid keys of rank ``round(t (len - 1) / (M - 1))``
    among the valid ones (file order), first and last included, wherever the mask
    puts them (a row with no valid key uses the last key; its queries are masked
    anyway). Reduced in the work dtype (fp32, or fp64), no host sync.
    """
    b, h, m, d = k.shape
    steps = torch.linspace(0, 1, NUM_LANDMARKS, dtype=torch.float64, device=k.device)
    if cols is None:
        index = (steps * (m - 1)).round().long().view(1, 1, -1).expand(b, h, -1)
    else:
        seen = cols.expand(b, h, m).to(torch.int64).cumsum(-1)  # valid keys up to and including j
        ranks = (steps * (seen[..., -1:] - 1).clamp(min=0)).round().long()  # (b, h, M)
        index = torch.searchsorted(seen, ranks + 1).clamp_(max=m - 1)  # first key with that many valid ones
    keys = torch.gather(k, -2, index.unsqueeze(-1).expand(b, h, NUM_LANDMARKS, d))  # (b, h, M, d)
    scores = torch.matmul(q, keys.transpose(-1, -2)).mul_(scale)  # (b, h, n, M)
    return torch.logsumexp(scores, dim=-1) - math.log(NUM_LANDMARKS)


#: ``lse_keys``: largest ``(c, n, m)`` block of scores formed at once (bytes of the work dtype); the rows are
#: independent, so blocks of ``(b, h)`` problems bound the memory without changing the result.
KEYS_LSE_BLOCK_BYTES = 4 * 2**20


def _keys_lse(q: Tensor, k: Tensor, *, scale: float, cols: Tensor | None) -> Tensor:
    """``log mean_j exp(scale <q_i, k_j>)`` over the valid keys ``cols (b, 1 or h, m)`` (None: all): ``(b, h, n)``.

    The scores are formed for blocks of ``(b, h)`` problems of at most :data:`KEYS_LSE_BLOCK_BYTES`, never
    as one ``(b, h, n, m)`` tensor; reduced in the dtype of ``q`` (fp32 or fp64, the caller's work dtype),
    with the row maximum subtracted. A row with no valid key gives 0 (its queries are masked anyway). No
    host sync. Without autograd the blocks are exponentiated in place.
    """
    b, h, n, d = q.shape
    m = k.shape[-2]
    problems = b * h
    qs, kt = (q * scale).reshape(problems, n, d), k.reshape(problems, m, d).transpose(-1, -2)  # scale on O(n d)
    keys = None if cols is None else cols.expand(b, h, m).reshape(problems, 1, m)
    count = torch.full((problems, 1), float(m), dtype=q.dtype, device=q.device) if keys is None else \
        keys.sum(-1).to(q.dtype)  # fmt: skip
    # padding keys as an additive bias of the product (one pass); the lowest finite value, not -inf, so that a
    # row without keys stays finite (and its gradient 0)
    bias = None if keys is None else \
        torch.full(keys.shape, torch.finfo(q.dtype).min, dtype=q.dtype, device=q.device).masked_fill_(keys, 0.0)  # fmt: skip
    per_block = max(1, KEYS_LSE_BLOCK_BYTES // max(1, n * m * q.element_size()))
    grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad)
    parts = []
    for start in range(0, problems, per_block):  # static Python loop: no host sync
        part = slice(start, min(start + per_block, problems))
        s = torch.bmm(qs[part], kt[part]) if bias is None else torch.baddbmm(bias[part], qs[part], kt[part])
        if grad:
            lse = torch.logsumexp(s, dim=-1)
        else:
            top = s.amax(dim=-1, keepdim=True)
            lse = s.sub_(top).exp_().sum(dim=-1).log_().add_(top.squeeze(-1))
        parts.append(lse)
    lse = torch.cat(parts) - count.clamp(min=1).log()
    if keys is not None:
        lse = torch.where(count > 0, lse, torch.zeros((), dtype=lse.dtype, device=lse.device))
    return lse.reshape(b, h, n)


def _product_features(q: Tensor, k: Tensor, name: str, *, scale: float, cols: Tensor | None) -> Tensor:
    """One extra of :data:`PRODUCT_FEATURES`, uncentred ``(b, h, n)``."""
    fn = _landmark_lse if name == "lse_landmarks" else _keys_lse
    return fn(q, k, scale=scale, cols=cols)


def extra_query_features(q: Tensor, k: Tensor, *, names: tuple[str, ...], scale: float, attn_mask: Tensor | None) -> Tensor:
    """Per-token features ``(b, h, E, n)`` (fp32, or fp64 for fp64 inputs), centred over valid queries, 0 at padding."""
    rows, cols = valid_rows_cols(attn_mask, q.shape[-2], k.shape[-2])
    return _extra_query_features(q, k, names=names, scale=scale, rows=rows, cols=cols)


def _extra_query_features(q: Tensor, k: Tensor, *, names: tuple[str, ...], scale: float, rows: Tensor | None,
                          cols: Tensor | None) -> Tensor:  # fmt: skip
    """:func:`extra_query_features` from valid queries ``rows (..., n)`` and keys ``cols (..., m)``."""
    names = _check_extra_features(names)
    dtype = _work_dtype(q.dtype)
    q, k = q.to(dtype), k.to(dtype)
    k_mean = _valid_key_mean(k, cols)
    computed = {
        "qk_mean": lambda: scale * torch.einsum("bhnd,bhd->bhn", q, k_mean),
        "q_norm": lambda: scale**2 * (q * q).sum(-1),
        "lse_landmarks": lambda: _landmark_lse(q, k, scale=scale, cols=cols),
        "lse_keys": lambda: _keys_lse(q, k, scale=scale, cols=cols),
    }
    feats = torch.stack([computed[name]() for name in names], dim=2)  # (b, h, E, n)
    valid = None if rows is None else rows.expand(*q.shape[:-1]).unsqueeze(2)
    return center_over(feats, valid=valid)


class DualMap(nn.Module):
    """Base of the dual-map families: slice directions, extras, and a per-head map ``x (b, h, F, n) -> f_hat``.

    What every kind shares (module docstring): the ``L`` slice directions
    ``directions (h, L, d)`` drawn from ``seed``, the ``E`` extra features, the
    inputs ``x = features(q, k) (b, h, L + E, n)`` (each column centred over
    valid queries, 0 at padding) and the flag ``fitted``. A kind adds its own
    buffers, :meth:`predict`, :meth:`set_coefficients` and its structural
    options :data:`OPTIONS` (``name -> (default, smallest, largest)``, integers),
    taken as keyword arguments by its constructor and refused when unknown or
    out of range by :meth:`check_options`.

    Contract (checked by the tests of each kind): buffers only (fitted at
    compile time, saved and loaded with the state dict), every reduction in
    fp32 (fp64 for fp64 inputs), no host synchronisation in :meth:`forward`,
    fp32 output equal to an fp64 reference to fp32 rounding.
    """

    kind: ClassVar[str] = ""
    OPTIONS: ClassVar[dict[str, tuple[int, int, int]]] = {}

    @classmethod
    def check_options(cls, options: Mapping[str, Any] | None = None) -> dict[str, int]:
        """The kind's options with defaults filled in; unknown names and bad values refused (one-line ``ValueError``)."""
        options = {} if options is None else options
        if not isinstance(options, Mapping):
            raise ValueError(f"dual map {cls.kind!r}: map options must be a mapping of names to values, got {options!r:.60}")
        unknown = sorted(set(options) - set(cls.OPTIONS))
        if unknown:
            raise ValueError(f"dual map {cls.kind!r} does not take option(s) {unknown}; its options are {sorted(cls.OPTIONS)}")
        checked = {}
        for name, (default, low, high) in cls.OPTIONS.items():
            value = options.get(name, default)
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise ValueError(f"dual map {cls.kind!r}: {name} must be an integer in [{low}, {high}], got {value!r:.40}")
            checked[name] = value
        return checked

    @property
    def map_options(self) -> dict[str, int]:
        """The kind's structural options (what rebuilds it besides the slices; ``{}`` for the linear map)."""
        return {name: getattr(self, name) for name in self.OPTIONS}

    def _init_slices(self, *, num_heads: int, head_dim: int, num_slices: int, slice_type: SliceType, seed: int,
                     extra_features: tuple[str, ...]) -> None:  # fmt: skip
        """Shapes, ``directions`` and ``seed`` (the buffers every kind has), as :class:`SliceDualMap` sets them."""
        self.num_heads, self.head_dim, self.num_slices = num_heads, head_dim, num_slices
        self.slice_type = slice_type
        self.extra_features = _check_extra_features(extra_features)
        directions = make_directions(
            num_heads=num_heads, head_dim=head_dim, num_slices=num_slices, slice_type=slice_type, seed=seed
        )
        self.register_buffer("directions", directions)
        self.register_buffer("seed", torch.tensor(seed, dtype=torch.int64))

    @property
    def num_features(self) -> int:
        """Columns of the inputs ``x``: ``L + E``."""
        return self.num_slices + len(self.extra_features)

    def _check_shape(self, q: Tensor) -> None:
        if q.shape[1] != self.num_heads or q.shape[-1] != self.head_dim:
            raise ValueError(
                f"dual map fitted for {self.num_heads} heads of size {self.head_dim}, got q of shape {tuple(q.shape)}"
            )

    def features(self, q: Tensor, k: Tensor, *, scale: float, attn_mask: Tensor | None = None) -> Tensor:
        """The design matrix ``(b, h, L + E, n)``: slice potentials, then extras (each centred over valid queries)."""
        rows, cols = valid_rows_cols(attn_mask, q.shape[-2], k.shape[-2])
        return self._features(q, k, scale=scale, rows=rows, cols=cols)

    def _features(self, q: Tensor, k: Tensor, *, scale: float, rows: Tensor | None, cols: Tensor | None) -> Tensor:
        """:meth:`features` from valid queries ``rows (b, 1 or h, n)`` and keys ``cols (b, 1 or h, m)`` (None: all)."""
        phi = _slice_potentials(q, k, self.directions, scale=scale, rows=rows, cols=cols)
        if not self.extra_features:
            return phi
        extra = _extra_query_features(q, k, names=self.extra_features, scale=scale, rows=rows, cols=cols)
        return torch.cat([phi, extra.to(phi.dtype)], dim=2)

    def predict(self, x: Tensor, *, valid: Tensor | None = None) -> Tensor:
        """``f_hat (b, h, n)`` from the inputs ``x (b, h, L + E, n)``, centred over ``valid (b, 1 or h, n)`` queries."""
        raise NotImplementedError

    def set_coefficients(self, coef: Tensor) -> None:
        """Write the linear term ``(h, L + E)`` (a richer kind's nonlinear part becomes zero) and mark the map fitted."""
        raise NotImplementedError

    def forward(
        self,
        q: Tensor,
        k: Tensor,
        *,
        scale: float,
        attn_mask: Tensor | None = None,
        padding_mask: Tensor | None = None,
        center: bool = True,
    ) -> Tensor:
        """Predicted query dual ``f_hat (b, h, n)`` in fp32 (fp64 for fp64 inputs): ``predict(features(q, k))``.

        ``padding_mask (b, n)`` (True = real token) is the vector form of the
        self-attention padding mask (``O(b n)`` memory, no ``(b, 1, n, n)``
        mask). This generic path always centres (``center`` is accepted for the
        operator's call and ignored: a constant per ``(b, h)`` is irrelevant to
        the closure anyway).
        """
        self._check_shape(q)
        if padding_mask is not None:
            if attn_mask is not None or q.shape[-2] != k.shape[-2]:
                raise ValueError("dual map: padding_mask is for self-attention (n = m)")
            rows = cols = padding_mask[:, None, :]
        else:
            rows, cols = valid_rows_cols(attn_mask, q.shape[-2], k.shape[-2])
        x = self._features(q, k, scale=scale, rows=rows, cols=cols)
        return self.predict(x, valid=rows)


class SliceDualMap(DualMap):
    """Linear map from slice potentials (plus optional extras) to the Sinkhorn query dual, one per head.

    Buffers: ``directions (h, L, d)``, ``coef (h, L)``, ``seed``, ``fitted``
    (False until ``asap compile`` writes the coefficients) and, with
    ``extra_features``, ``extra_coef (h, E)``. ``kind`` names the map family in
    :data:`DUAL_MAPS`.
    """

    kind = "linear"
    #: Whether short rows may take a kernel (:meth:`_forward_fused`: C on the CPU, Triton on CUDA); set False on
    #: a map (or ``ASAP_NATIVE=0`` in the environment, for the CPU one) to keep the PyTorch path, e.g. to compare.
    use_native: bool = True

    def __init__(
        self,
        *,
        num_heads: int,
        head_dim: int,
        num_slices: int = 16,
        slice_type: SliceType = "random",
        seed: int = 0,
        extra_features: tuple[str, ...] = (),
    ):
        super().__init__()
        self._init_slices(num_heads=num_heads, head_dim=head_dim, num_slices=num_slices, slice_type=slice_type,
                          seed=seed, extra_features=extra_features)  # fmt: skip
        self.register_buffer("coef", torch.zeros(num_heads, num_slices))
        if self.extra_features:  # only then: plain maps keep the state dict (keys) they always had
            self.register_buffer("extra_coef", torch.zeros(num_heads, len(self.extra_features)))
        self.register_buffer("fitted", torch.tensor(False))

    def extra_repr(self) -> str:
        extra = f", extra_features={self.extra_features}" if self.extra_features else ""
        return f"heads={self.num_heads}, slices={self.num_slices}, slice_type={self.slice_type!r}{extra}"

    def coefficients(self) -> Tensor:
        """All coefficients ``(h, L + E)``, in the column order of :meth:`features`."""
        if not self.extra_features:
            return self.coef
        return torch.cat([self.coef, self.extra_coef], dim=-1)

    @torch.no_grad()
    def set_coefficients(self, coef: Tensor) -> None:
        """Write fitted coefficients ``(h, L + E)`` into the buffers and mark the map fitted."""
        if tuple(coef.shape) != (self.num_heads, self.num_features):
            raise ValueError(f"coefficients of shape {tuple(coef.shape)} for a map of shape {(self.num_heads, self.num_features)}")
        self.coef.copy_(coef[:, : self.num_slices])
        if self.extra_features:
            self.extra_coef.copy_(coef[:, self.num_slices :])
        self.fitted.fill_(True)

    def predict(self, x: Tensor, *, valid: Tensor | None = None) -> Tensor:
        """``f_hat = center(sum_c coef_{h,c} x_{b,h,c,n})`` over ``valid (b, 1 or h, n)`` queries: ``(b, h, n)``."""
        f_hat = torch.einsum("bhln,hl->bhn", x, self.coefficients().to(x.dtype))
        return _center(f_hat, None if valid is None else valid.expand(*f_hat.shape), True)

    def forward(
        self,
        q: Tensor,
        k: Tensor,
        *,
        scale: float,
        attn_mask: Tensor | None = None,
        padding_mask: Tensor | None = None,
        center: bool = True,
    ) -> Tensor:
        """Predicted query dual ``f_hat (b, h, n)`` in fp32 (fp64 for fp64 inputs).

        ``padding_mask (b, n)`` (True = real token) is the vector form of the
        self-attention padding mask. With ``center=False`` the result is the
        same up to a constant per ``(b, h)`` and is arbitrary at padded queries
        (both irrelevant to :func:`asap.attention.asap_attention`).
        """
        self._check_shape(q)
        if attn_mask is None and q.shape[-2] == k.shape[-2]:
            return self._forward_fused(q, k, scale=scale, valid=padding_mask, center=center)
        if padding_mask is not None:
            raise ValueError("dual map: padding_mask is for self-attention (n = m)")
        phi = self.features(q, k, scale=scale, attn_mask=attn_mask)
        f_hat = torch.einsum("bhln,hl->bhn", phi, self.coefficients().to(phi.dtype))
        rows, _ = valid_rows_cols(attn_mask, q.shape[-2], k.shape[-2])
        return _center(f_hat, None if rows is None else rows.expand(*f_hat.shape), center)

    def _forward_fused(self, q: Tensor, k: Tensor, *, scale: float, valid: Tensor | None, center: bool) -> Tensor:
        """``n = m``: the matching is rank to rank (padding sorted last), the coefficients fold into the steps.

        Without autograd, the rows go to a kernel: on the CPU (every length; measured faster than this
        path at every shape of ``scripts/bench_asap_paths.py``, 17 to 1024 tokens) the native C kernel
        (:meth:`_forward_native`),
        on CUDA (where :func:`asap.attention.triton_dual_map.worth_it`, no landmark feature) the Triton
        kernel of :mod:`asap.attention.triton_dual_map`, one launch instead of ~25.
        """
        if self.use_native and native.supports(q, k) is None:
            return self._forward_native(q, k, scale=scale, valid=valid, center=center)
        if self.use_native and q.device.type == "cuda" and not self._product_extras():
            from asap.attention import triton_dual_map  # CUDA only: keeps Triton out of CPU imports

            if triton_dual_map.worth_it(q) and triton_dual_map.supports_dual_map(q, k, valid) is None:
                f_hat = triton_dual_map.slice_dual_map_triton(q, k, self.directions, self.coef, scale=scale, valid=valid,
                                                              **self._moment_coefficients())  # fmt: skip
                return _center_tokens(f_hat, valid, center)
        dtype = _work_dtype(q.dtype)
        q, k = q.to(dtype), k.to(dtype)
        b, h, n, d = q.shape
        L = self.num_slices
        f_hat = self._extras(q, k, scale=scale, valid=valid)
        # Unscaled projections: the attention scale folds into the per-slice step factor below.
        x, y = _project_pair(self.directions.to(dtype), q, k)  # (b, h, L, n) each
        if valid is not None:  # padding sorts last: the valid prefixes are then matched rank to rank
            zero = torch.zeros((), dtype=dtype, device=q.device)
            rows, inf = valid[:, None, None, :], torch.full((), float("inf"), dtype=dtype, device=q.device)
            perm, ys = argsort_and_sort_last(torch.where(rows, x, inf), torch.where(rows, y, inf))
            ranks = torch.arange(n, device=q.device) < valid.sum(dim=-1)[:, None, None, None]
            ys = torch.where(ranks, ys, zero)  # no inf left
        else:
            perm, ys = argsort_and_sort_last(x, y)
        xs = torch.gather(x, -1, perm)
        # f_(r+1) - f_(r) = -y_(r) (x_(r+1) - x_(r)); each slice's steps pre-multiplied by -scale * its coefficient.
        step = torch.diff(xs, dim=-1).mul_(ys[..., :-1]).mul_(torch.mul(self.coef.to(dtype), -scale)[:, :, None])
        if valid is not None:  # a step from the last valid rank on involves padding: dropped
            step = torch.where(ranks[..., 1:], step, zero)
        # f_(0) = 0: the cumulative sum goes into a zero-first buffer, so the full permutation
        # (contiguous, no copy of perm[..., 1:]) scatters every slice into f_hat at once.
        if torch.is_grad_enabled() and step.requires_grad:  # out= has no autograd
            f_sorted = torch.nn.functional.pad(step.cumsum(dim=-1), (1, 0))
        else:
            f_sorted = q.new_zeros(b, h, L, n)
            torch.cumsum(step, dim=-1, out=f_sorted[..., 1:])
        # reshape, not view: torch.sort (CUDA, torch.compile) keeps the projections' permuted strides in perm.
        f_hat = f_hat.scatter_add_(-1, perm.reshape(b, h, -1), f_sorted.view(b, h, -1))
        return _center_tokens(f_hat, valid, center)

    def native_arguments(self) -> dict[str, Any] | None:
        """This map as keyword arguments of :func:`asap.attention.native.asap_forward_native` with the closure
        (``v`` given), or None.

        None when the native kernel cannot evaluate it on its own: ``use_native`` is off, or the map has
        ``lse_landmarks`` (a matrix product the kernel does not take). ``lse_keys`` goes in as ``c_lse``: the
        kernel forms it from the closure's scores.
        """
        if not self.use_native or "lse_landmarks" in self.extra_features:
            return None
        arguments = dict(directions=self.directions, coef=self.coef, **self._moment_coefficients())
        if "lse_keys" in self.extra_features:
            arguments["c_lse"] = self.extra_coef[:, self.extra_features.index("lse_keys")]
        return arguments

    def _moment_coefficients(self) -> dict[str, Tensor | None]:
        """The coefficients ``(h,)`` of the two moment extras as the kernels take them (None: no such feature)."""
        names = self.extra_features
        return {arg: self.extra_coef[:, names.index(name)] if name in names else None
                for arg, name in (("c_mean", "qk_mean"), ("c_norm", "q_norm"))}  # fmt: skip

    def _forward_native(self, q: Tensor, k: Tensor, *, scale: float, valid: Tensor | None, center: bool) -> Tensor:
        """:meth:`_forward_fused` in one native pass per ``(b, h)`` (:mod:`asap.attention.native`); fp32.

        The kernel takes the slices and the two moment extras; the extras of :data:`PRODUCT_FEATURES`
        (matrix products) are added here.
        """
        products = self._product_extras()
        f_hat = native.asap_forward_native(q, k, scale=scale, valid=valid, center=center and not products,
                                           directions=self.directions, coef=self.coef, **self._moment_coefficients())  # fmt: skip
        if not products:
            return f_hat
        f_hat = self._add_product_extras(f_hat, q.to(torch.float32), k.to(torch.float32), scale=scale, valid=valid)
        return _center_tokens(f_hat, valid, center)

    def _product_extras(self) -> list[str]:
        return [name for name in self.extra_features if name in PRODUCT_FEATURES]

    def _add_product_extras(self, out: Tensor, q: Tensor, k: Tensor, *, scale: float, valid: Tensor | None) -> Tensor:
        """``out += sum_e beta_e x_e`` over this map's extras of :data:`PRODUCT_FEATURES` (uncentred), in place."""
        cols = None if valid is None else valid[:, None, :]
        for name in self._product_extras():
            x = _product_features(q, k, name, scale=scale, cols=cols)
            out = out.add_(x.mul_(self.extra_coef[:, self.extra_features.index(name)].to(x.dtype)[None, :, None]))
        return out

    def _extras(self, q: Tensor, k: Tensor, *, scale: float, valid: Tensor | None) -> Tensor:
        """``sum_e beta_e x_e(i)``, uncentred, ``(b, h, n)`` (a fresh tensor: the slices are added into it).

        The two moment extras are one dot product per token: ``<q_i, beta_1 scale kbar + beta_2 scale^2 q_i>``;
        the log-sum-exps (:data:`PRODUCT_FEATURES`) are added to it.
        """
        b, h, n, d = q.shape
        if not self.extra_features:
            return q.new_zeros(b, h, n)
        beta = self.extra_coef.to(q.dtype)
        partner = None
        if "qk_mean" in self.extra_features:
            e = self.extra_features.index("qk_mean")
            kbar = _valid_key_mean(k, None if valid is None else valid[:, None, :])
            partner = (kbar * (scale * beta[:, e])[None, :, None]).unsqueeze(-2)  # (b, h, 1, d)
        if "q_norm" in self.extra_features:
            c2 = (scale**2 * beta[:, self.extra_features.index("q_norm")])[None, :, None, None]
            partner = q * c2 if partner is None else torch.addcmul(partner, q, c2)
        out = q.new_zeros(b, h, n) if partner is None else torch.linalg.vecdot(q, partner.expand_as(q))
        return self._add_product_extras(out, q, k, scale=scale, valid=valid)


#: Longest rows projected with one product per head (scripts/bench_asap_paths.py: faster up to n = 64,
#: slower at n = 128 where the copy to the per-head layout costs more than the small products).
PER_HEAD_PROJECTION_MAX_N = 64


def _project_pair(directions: Tensor, q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
    """``directions (h, L, d)`` applied to every token of ``q`` and ``k`` (``(b, h, n, d)``): two ``(b, h, L, n)``.

    Up to :data:`PER_HEAD_PROJECTION_MAX_N` tokens per row, one product per head over
    all ``2 b n`` query and key tokens, ``(L, d) @ (d, 2 b n)``, instead of ``2 b h``
    products of ``(L, d) @ (d, n)`` (broadcast ``matmul``): at small ``n`` the many tiny
    products cost more than the work. The results are then views of one
    ``(h, L, 2, b, n)`` buffer whose last dim is contiguous (what the sorts, gathers and
    scans that follow read row by row).
    """
    b, h, n, d = q.shape
    if n > PER_HEAD_PROJECTION_MAX_N or k.shape != q.shape:  # long rows: the broadcast products are large enough
        return torch.matmul(directions, q.transpose(-1, -2)), torch.matmul(directions, k.transpose(-1, -2))
    tokens = torch.stack([q.transpose(0, 1), k.transpose(0, 1)], dim=1)  # (h, 2, b, n, d), one copy
    proj = torch.bmm(directions, tokens.view(h, 2 * b * n, d).transpose(1, 2)).view(h, -1, 2, b, n)
    return proj[:, :, 0].permute(2, 0, 1, 3), proj[:, :, 1].permute(2, 0, 1, 3)


def _center(f_hat: Tensor, valid: Tensor | None, enabled: bool) -> Tensor:
    return center_over(f_hat, valid=valid) if enabled else f_hat


def _center_tokens(f_hat: Tensor, valid: Tensor | None, enabled: bool) -> Tensor:
    """:func:`_center` over the queries a token mask ``valid (b, n)`` keeps (``f_hat (b, h, n)``)."""
    return _center(f_hat, None if valid is None else valid.unsqueeze(1).expand_as(f_hat), enabled)


class ExtendedSliceDualMap(SliceDualMap):
    """:class:`SliceDualMap` with at least one extra feature (the class older artifacts name)."""

    def __init__(self, *, num_heads: int, head_dim: int, num_slices: int = 16, slice_type: str = "random",
                 seed: int = 0, extra_features: tuple[str, ...] = ("qk_mean",)):  # fmt: skip
        if not extra_features:
            raise ValueError(f"extra_features must be a non-empty subset of {EXTRA_FEATURES}, got {extra_features}")
        super().__init__(
            num_heads=num_heads, head_dim=head_dim, num_slices=num_slices, slice_type=slice_type, seed=seed,
            extra_features=extra_features,
        )  # fmt: skip


#: The dual-map families, by the ``kind`` an operator's options name. Each is a :class:`DualMap`: it takes
#: ``num_heads, head_dim, num_slices, slice_type, seed, extra_features`` and its own :data:`DualMap.OPTIONS`,
#: and offers ``features`` (the fit-ready inputs), ``predict``, ``set_coefficients`` and ``forward``.
#: ``"relu"`` and ``"mlp"`` (:mod:`asap.attention.nonlinear_maps`) register themselves in ``asap.attention``'s
#: ``__init__``, which every import of an ``asap.attention`` module runs first.
DUAL_MAPS: dict[str, type[DualMap]] = {"linear": SliceDualMap}


def register_dual_map(cls: type[DualMap]) -> type[DualMap]:
    """Add a dual-map family under ``cls.kind``."""
    DUAL_MAPS[cls.kind] = cls
    return cls


def dual_map_class(kind: str) -> type[DualMap]:
    """The family registered as ``kind``; an unknown kind is a one-line ``ValueError``."""
    if kind not in DUAL_MAPS:
        raise ValueError(f"unknown dual map kind {kind!r}; choose one of {sorted(DUAL_MAPS)}")
    return DUAL_MAPS[kind]


def build_dual_map(
    *,
    num_heads: int,
    head_dim: int,
    num_slices: int,
    slice_type: str,
    seed: int,
    extra_features: tuple[str, ...] = (),
    kind: str = "linear",
    map_options: Mapping[str, Any] | None = None,
) -> DualMap:
    """An unfitted dual map of family ``kind`` with its ``map_options`` (``ExtendedSliceDualMap`` for a linear map with extras)."""
    cls = dual_map_class(kind)
    options = cls.check_options(map_options)
    if cls is SliceDualMap and extra_features:
        cls = ExtendedSliceDualMap
    return cls(
        num_heads=num_heads, head_dim=head_dim, num_slices=num_slices, slice_type=slice_type, seed=seed,
        extra_features=tuple(extra_features), **options,
    )  # fmt: skip


def num_features(dual_map: DualMap) -> int:
    return dual_map.num_features


def set_coefficients(dual_map: DualMap, coef: Tensor) -> None:
    """Write fitted coefficients ``(h, L + E)`` into the map's buffers and mark it fitted."""
    dual_map.set_coefficients(coef)
