"""Per-slice 1-D nonlinear dual maps: triangle-wave ReLU networks with exactly 2^k linear pieces.

The parameterisation is the one of Milkert, Hyde and Laine, "Compelling ReLU
Networks to Exhibit Exponentially Many Linear Regions at Initialization and
During Training" (ICML 2025, arXiv 2311.18022), restated here in the
project's notation. Where the paper's text could not be consulted the
construction below is derived from its stated ingredients (triangle
functions on [0, 1] built by a pair of ReLUs, composed; output scales tied to
the peaks by ``s_{i+1} = s_i (1 - a_{i+1}) a_{i+2}``) and every property used
is proved in this docstring and checked by the tests.

**Triangle layer.** For a peak ``a`` in (0, 1) a pair of ReLU neurons gives
the triangle function on [0, 1]::

    T_a(z) = relu(z) / a - relu(z - a) / (a (1 - a)),      T_a(0) = T_a(1) = 0,  T_a(a) = 1,

increasing on [0, a] and decreasing on [a, 1], each half mapped *onto* [0, 1].

**Depth-k stack.** ``z_0 = u``, ``z_i = T_{a_i}(z_{i-1})`` (i = 1..k). Each
piece of ``z_{i-1}`` maps an interval monotonically onto [0, 1], so
``T_{a_i}`` splits it in two: ``z_k`` has exactly ``2^k`` linear pieces on
[0, 1] for *every* choice of peaks in (0, 1), and every interior breakpoint is
the peak (``z_i = 1``) of exactly one level ``i``; it is a valley (value 0) of
all later levels. A constant-width ReLU network computes it (width 3: the two
triangle neurons and a non-negative running sum, :func:`relu_network_layers`).

**Readout on the scaling manifold (convex case).** The network's output is::

    N(u) = - sum_{i=1..k} s_i z_i(u),
    s_1 = a_1 a_2,     s_{i+1} = s_i (1 - a_{i+1}) a_{i+2}     (i = 1..k-1),

with ``k + 1`` peaks: ``a_{k+1}`` is the peak of the layer one would add next;
it enters only the last scale. The recursion is the paper's scaling law; it
is what makes the infinite-depth limit differentiable at every breakpoint.
At a level-i breakpoint where ``z_{i-1}`` has slope ``sigma``, the slope of
``z_i`` jumps by ``-|sigma| / (a_i (1 - a_i))``, that of ``z_{i+1}`` by
``+|sigma| / (a_i (1 - a_i) (1 - a_{i+1}))`` and each deeper level multiplies
that by ``1 / a_j``. With the law the jumps telescope and the slope of ``N``
jumps by::

    |sigma| / (a_i (1 - a_i)) * s_i * prod_{j=i+2..k+1} (1 - a_j)   >  0,

strictly positive at every one of the ``2^k - 1`` interior breakpoints. So
``N`` is **convex with exactly 2^k linear pieces on [0, 1]** for every peak
vector in (0, 1)^{k+1} (in the limit k -> inf the jumps vanish: the limit is
differentiable). The normalisation ``s_1 = a_1 a_2`` makes ``N'(0) -> -1``
(so ``u + N(u)`` starts flat); it only fixes the scale, which the readout
weight carries anyway.

**Initialisation on the manifold.** All peaks ``1/2`` give ``s_i = 4^{-i}``
and ``u + N(u)`` is exactly the piecewise-linear interpolant of ``u^2`` at
the ``2^k + 1`` nodes ``j / 2^k`` (the classical sawtooth construction of
x^2 that the paper generalises). Training moves only the raw peaks; the map
``a = delta + (1 - 2 delta) sigmoid(raw)`` keeps every peak in
``[delta, 1 - delta]``, so the 2^k pieces and convexity hold throughout
training *by construction*, not by a penalty.

**Non-convex extension** *(choice)*. Every function with a bounded second
derivative on an interval is a difference of convex functions
(``f = (f + c u^2) - c u^2``), so a slice map is a signed combination of
``M`` convex stacks with their own peaks::

    h_l(x) = sum_{m=1..M} w_{l,m} N_{l,m}(u_l(x)),

each ``N_{l,m}`` convex with exactly 2^k pieces; ``M = 1`` is the convex
(``w >= 0``) or concave (``w < 0``) case. The same sum of 1-D convex units
over many input directions is how the paper's construction leaves one
dimension. With ``M >= 2`` stack ``m`` starts with ``a_1 = m / (M + 1)`` (the
others 1/2), so the stacks are distinct on the manifold at initialisation.

**Input normalisation.** The stacks live on [0, 1]. Per (head, slice) an
affine map ``u = clamp((phi - lo) / (hi - lo), 0, 1)`` sends the calibration
range of the potentials (``lo, hi``: buffers, fitted by
:meth:`ReluSliceDualMap.set_input_range` from :func:`slice_range` statistics
with a margin) onto [0, 1]; outside it the nonlinear part is constant and the
linear features extrapolate.

**The dual map** (:class:`ReluSliceDualMap`), per head::

    f_hat_i = sum_l sum_m w_{l,m} N_{l,m}(u_l(phi_l(i)))  +  sum_F beta_F feat_F(i),   centred,

where ``feat (b, h, F, n)`` are linear features computed elsewhere (today's
linear map: the potentials ``phi`` themselves, ``qk_mean``, ``q_norm``).
Fit: :func:`fit_readout` (ridge least squares in fp64, Cholesky, network at
its initialisation), then :func:`refine` (Adam or L-BFGS on any
differentiable objective, peaks and readout together).

Shapes: ``phi (b, h, L, n)``, ``feat (b, h, F, n)``, ``valid (b, 1 or h, n)``
bool (True = real query), ``raw_peaks (h, L, M, k + 1)``, ``lo, hi (h, L)``,
``coef (h, L M + F)``. Compute in fp32 (fp64 for fp64 inputs); forward passes
have no host synchronisation.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
from torch import Tensor, nn

from asap.attention.least_squares import check_training_r2, residual_and_r2, solve_normal_equations
from asap.transport.sinkhorn import center

#: Peaks are kept in ``[PEAK_MARGIN, 1 - PEAK_MARGIN]``: strictly inside (0, 1) even where
#: sigmoid saturates in fp32, so no triangle degenerates (a division by ``a (1 - a)``).
PEAK_MARGIN = 1e-3
#: Smallest width of the calibrated input interval, relative to ``1 + |lo|`` (constant potentials).
MIN_RANGE = 1e-6


# --------------------------------------------------------------------------- pure parameterisation


def peaks_from_raw(raw: Tensor) -> Tensor:
    """Unconstrained ``raw (..., k+1)`` -> peaks ``a`` in ``[PEAK_MARGIN, 1 - PEAK_MARGIN]``."""
    return PEAK_MARGIN + (1 - 2 * PEAK_MARGIN) * torch.sigmoid(raw)


def raw_from_peaks(peaks: Tensor) -> Tensor:
    """Inverse of :func:`peaks_from_raw` (peaks must lie strictly inside the margin)."""
    p = (peaks - PEAK_MARGIN) / (1 - 2 * PEAK_MARGIN)
    return torch.log(p) - torch.log1p(-p)


def scales_from_peaks(peaks: Tensor) -> Tensor:
    """Output scales on the manifold: ``(..., k+1)`` peaks -> ``(..., k)`` scales.

    ``s_1 = a_1 a_2`` and ``s_{i+1} = s_i (1 - a_{i+1}) a_{i+2}`` (1-based), i.e.
    ``s_i = a_1 a_2 prod_{j=2..i} (1 - a_j) a_{j+1}``.
    """
    k = peaks.shape[-1] - 1
    if k < 1:
        raise ValueError(f"a depth-k triangle network needs k + 1 >= 2 peaks, got {peaks.shape[-1]}")
    first = peaks[..., 0:1] * peaks[..., 1:2]
    steps = (1 - peaks[..., 1:k]) * peaks[..., 2 : k + 1]  # (..., k-1): factors of s_2..s_k
    return first * torch.cat([torch.ones_like(first), torch.cumprod(steps, dim=-1)], dim=-1)


def triangle(z: Tensor, a: Tensor) -> Tensor:
    """``T_a(z) = relu(z)/a - relu(z - a)/(a (1 - a))``: the two-neuron triangle layer."""
    return torch.relu(z) / a - torch.relu(z - a) / (a * (1 - a))


def triangle_network(u: Tensor, peaks: Tensor) -> Tensor:
    """The convex network ``N(u) = -sum_i s_i z_i(u)`` (module docstring), elementwise in ``u``.

    Args:
        u: inputs in [0, 1], ``(..., n)``.
        peaks: ``(..., k+1)`` with the leading dims broadcastable against ``u.shape[:-1]``.

    Returns:
        ``N(u)``, shape of ``u``; convex with exactly ``2^k`` linear pieces on [0, 1].
    """
    scales = scales_from_peaks(peaks).unsqueeze(-2)  # (..., 1, k)
    a = peaks.unsqueeze(-2)  # (..., 1, k+1)
    z, out = u, torch.zeros_like(u)
    for i in range(peaks.shape[-1] - 1):  # depth k: a short, static loop
        z = triangle(z, a[..., i])
        out = out - scales[..., i] * z
    return out


def normalise_inputs(phi: Tensor, lo: Tensor, hi: Tensor) -> Tensor:
    """``u = clamp((phi - lo) / (hi - lo), 0, 1)``: ``phi (b, h, L, n)``, ``lo, hi (h, L)``."""
    lo, hi = lo.to(phi.dtype).unsqueeze(-1), hi.to(phi.dtype).unsqueeze(-1)
    return ((phi - lo) / (hi - lo)).clamp(0, 1)


def slice_functions(phi: Tensor, raw_peaks: Tensor, lo: Tensor, hi: Tensor) -> Tensor:
    """The per-slice nonlinear basis ``N_{l,m}(u_l(phi_l))``: ``(b, h, L, n) -> (b, h, L, M, n)``.

    ``raw_peaks (h, L, M, k+1)``; one network per (head, slice, stack), all evaluated at once.
    """
    u = normalise_inputs(phi, lo, hi).unsqueeze(-2)  # (b, h, L, 1, n)
    return triangle_network(u, peaks_from_raw(raw_peaks.to(phi.dtype)))


# --------------------------------------------------------------------------- explicit ReLU network (oracle)


def relu_network_layers(peaks: Tensor) -> list[tuple[Tensor, Tensor]]:
    """The same function as a plain ReLU network of depth ``k`` and constant width 3.

    ``peaks (k+1,)``. Hidden layer ``i`` holds ``relu(z_{i-1})``, ``relu(z_{i-1} - a_i)``
    and ``relu(P_{i-1})`` with ``P_i = sum_{j<=i} s_j z_j >= 0`` (the running sum
    needs no negative part). Returns ``[(W_1, b_1), ..., (W_k, b_k), (W_out, b_out)]``
    with ``W_1 (3, 1)``, ``W_i (3, 3)``, ``W_out (1, 3)``; each pre-activation is
    ``W h + b``. Used to count activation patterns and as an fp64 oracle.
    """
    if peaks.dim() != 1 or peaks.shape[0] < 2:
        raise ValueError(f"peaks must have shape (k+1,) with k >= 1, got {tuple(peaks.shape)}")
    k = peaks.shape[0] - 1
    s = scales_from_peaks(peaks)
    dtype = peaks.dtype
    layers = [(torch.tensor([[1.0], [1.0], [0.0]], dtype=dtype), torch.stack([peaks.new_zeros(()), -peaks[0], peaks.new_zeros(())]))]
    for i in range(1, k + 1):
        a = peaks[i - 1]
        # z_{i-1} = h1 / a - h2 / (a (1 - a)), P_{i-1} = h3 + s_{i-1} z_{i-1}
        zrow = torch.stack([1 / a, -1 / (a * (1 - a)), peaks.new_zeros(())])
        prow = torch.stack([s[i - 1] / a, -s[i - 1] / (a * (1 - a)), peaks.new_ones(())])
        if i < k:
            w = torch.stack([zrow, zrow, prow])
            b = torch.stack([peaks.new_zeros(()), -peaks[i], peaks.new_zeros(())])
        else:  # output N = -P_k
            w, b = -prow.unsqueeze(0), peaks.new_zeros(1)
        layers.append((w, b))
    return layers


def relu_network_forward(layers: list[tuple[Tensor, Tensor]], x: Tensor) -> tuple[Tensor, Tensor]:
    """Evaluate a scalar-input ReLU network on ``x (n,)``.

    Returns the output ``(n,)`` and the pre-activations ``(n, total hidden neurons)``
    of every hidden neuron (the activation pattern is ``pre > 0``), for any weights
    of the :func:`relu_network_layers` layout.
    """
    h = x.unsqueeze(-1)  # (n, 1)
    pres = []
    for w, b in layers[:-1]:
        pre = h @ w.T + b
        pres.append(pre)
        h = torch.relu(pre)
    w, b = layers[-1]
    return (h @ w.T + b).squeeze(-1), torch.cat(pres, dim=-1)


# --------------------------------------------------------------------------- the dual map


def initial_raw_peaks(*, num_heads: int, num_slices: int, depth: int, num_stacks: int) -> Tensor:
    """``(h, L, M, k+1)`` raw peaks on the manifold: all peaks 1/2, stack m's first peak m/(M+1) if M > 1."""
    peaks = torch.full((num_heads, num_slices, num_stacks, depth + 1), 0.5, dtype=torch.float64)
    if num_stacks > 1:
        peaks[..., 0] = torch.arange(1, num_stacks + 1, dtype=torch.float64) / (num_stacks + 1)
    return raw_from_peaks(peaks).to(torch.float32)


class ReluSliceDualMap(nn.Module):
    """Sum of per-slice triangle ReLU networks plus linear features, one map per head.

    Interface (what the compile stage calls):

    * :meth:`slice_features` ``(phi) -> (b, h, L M, n)``: the nonlinear basis;
    * :meth:`design` ``(phi, feat, valid) -> (b, h, L M + F, n)``: fit-ready
      (centred over valid queries, zero at padding) -- the readout is linear in it,
      so the normal equations of :func:`fit_readout` (or the compile stage's
      accumulators) apply unchanged;
    * :meth:`predict` ``(design) -> f_hat (b, h, n)``; ``forward = predict o design``.

    Buffers (saved and loaded with the state dict): ``raw_peaks (h, L, M, k+1)``,
    ``lo, hi (h, L)`` (input range), ``coef (h, L M + F)`` (readout: the
    ``L x M`` slice weights ``w_{l,m}``, slice-major, then the ``F`` linear
    coefficients), ``fitted`` and ``range_set`` flags. Buffers, not parameters:
    they are fitted at compile time, not trained with the host model.
    """

    def __init__(self, *, num_heads: int, num_slices: int, num_features: int, depth: int = 4, num_stacks: int = 1):
        super().__init__()
        for name, value, least in (("num_heads", num_heads, 1), ("num_slices", num_slices, 1),
                                   ("num_features", num_features, 0), ("depth", depth, 1), ("num_stacks", num_stacks, 1)):  # fmt: skip
            if int(value) != value or value < least:
                raise ValueError(f"{name} must be an integer >= {least}, got {value!r}")
        self.num_heads, self.num_slices, self.num_features = num_heads, num_slices, num_features
        self.depth, self.num_stacks = depth, num_stacks
        raw = initial_raw_peaks(num_heads=num_heads, num_slices=num_slices, depth=depth, num_stacks=num_stacks)
        self.register_buffer("raw_peaks", raw)
        self.register_buffer("lo", torch.zeros(num_heads, num_slices))
        self.register_buffer("hi", torch.ones(num_heads, num_slices))
        self.register_buffer("coef", torch.zeros(num_heads, self.num_design))
        self.register_buffer("range_set", torch.tensor(False))
        self.register_buffer("fitted", torch.tensor(False))

    @property
    def num_design(self) -> int:
        """Columns of the design: ``L M`` slice functions then ``F`` linear features."""
        return self.num_slices * self.num_stacks + self.num_features

    def extra_repr(self) -> str:
        return (f"heads={self.num_heads}, slices={self.num_slices}, depth={self.depth} "
                f"({2 ** self.depth} pieces), stacks={self.num_stacks}, linear_features={self.num_features}")  # fmt: skip

    def peaks(self) -> Tensor:
        """Current peaks ``(h, L, M, k+1)`` in (0, 1)."""
        return peaks_from_raw(self.raw_peaks)

    @torch.no_grad()
    def set_input_range(self, lo: Tensor, hi: Tensor, *, margin: float = 0.05) -> None:
        """Store the affine input map from calibration extremes ``lo, hi (h, L)``, widened by ``margin`` of the width."""
        if lo.shape != (self.num_heads, self.num_slices) or hi.shape != lo.shape:
            raise ValueError(f"input range of shape {tuple(lo.shape)}/{tuple(hi.shape)} for a map of "
                             f"{self.num_heads} heads x {self.num_slices} slices")  # fmt: skip
        if margin < 0 or not math.isfinite(margin):
            raise ValueError(f"margin must be a finite number >= 0, got {margin}")
        lo, hi = lo.double(), hi.double()
        if not bool(torch.isfinite(lo).all() & torch.isfinite(hi).all() & (hi >= lo).all()):
            raise ValueError("input range must be finite with hi >= lo (was a slice never observed?)")
        width = torch.maximum(hi - lo, MIN_RANGE * (1 + lo.abs()))
        centre = (hi + lo) / 2
        half = width * (0.5 + margin)
        self.lo.copy_(centre - half)
        self.hi.copy_(centre + half)
        self.range_set.fill_(True)

    def _check(self, phi: Tensor, feat: Tensor | None) -> None:
        if phi.dim() != 4 or phi.shape[1] != self.num_heads or phi.shape[2] != self.num_slices:
            raise ValueError(f"phi must be (b, {self.num_heads}, {self.num_slices}, n), got {tuple(phi.shape)}")
        shape = (phi.shape[0], self.num_heads, self.num_features, phi.shape[3])
        if self.num_features == 0 and feat is None:
            return
        if feat is None or tuple(feat.shape) != shape:
            got = None if feat is None else tuple(feat.shape)
            raise ValueError(f"linear features must be {shape} for this map, got {got}")

    def slice_features(self, phi: Tensor, *, raw_peaks: Tensor | None = None) -> Tensor:
        """``(b, h, L M, n)``: ``N_{l,m}(u_l(phi_l))``, slice-major (uncentred)."""
        dtype = torch.float64 if phi.dtype == torch.float64 else torch.float32
        phi = phi.to(dtype)
        raw = self.raw_peaks if raw_peaks is None else raw_peaks
        basis = slice_functions(phi, raw, self.lo, self.hi)  # (b, h, L, M, n)
        return basis.flatten(2, 3)

    def design(self, phi: Tensor, feat: Tensor | None = None, *, valid: Tensor | None = None,
               raw_peaks: Tensor | None = None) -> Tensor:  # fmt: skip
        """Fit-ready design ``(b, h, L M + F, n)``: slice functions then linear features, centred over valid queries."""
        self._check(phi, feat)
        basis = self.slice_features(phi, raw_peaks=raw_peaks)
        if self.num_features:
            basis = torch.cat([basis, feat.to(basis.dtype)], dim=2)
        mask = None if valid is None else valid.unsqueeze(2)
        return center(basis, valid=mask)

    def predict(self, design: Tensor, *, coef: Tensor | None = None) -> Tensor:
        """``f_hat (b, h, n) = sum_c coef_{h,c} design_{b,h,c,n}`` (centred, since the design is)."""
        coef = self.coef if coef is None else coef
        return torch.einsum("bhcn,hc->bhn", design, coef.to(design.dtype))

    def forward(self, phi: Tensor, feat: Tensor | None = None, *, valid: Tensor | None = None) -> Tensor:
        """Predicted, centred query dual ``f_hat (b, h, n)`` from potentials ``phi`` and linear features ``feat``."""
        return self.predict(self.design(phi, feat, valid=valid))


# --------------------------------------------------------------------------- fit at compile time


def slice_range(phi: Tensor, *, valid: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Per (head, slice) minimum and maximum of ``phi (b, h, L, n)`` over valid queries: ``(h, L)`` each, fp64.

    Combine batches with :func:`merge_ranges`; a slice with no valid query gives ``(+inf, -inf)``.
    """
    phi = phi.detach().double()
    if valid is None:
        return phi.amin(dim=(0, 3)), phi.amax(dim=(0, 3))
    mask = valid.unsqueeze(2).expand_as(phi)
    inf = torch.tensor(float("inf"), dtype=phi.dtype, device=phi.device)
    return torch.where(mask, phi, inf).amin(dim=(0, 3)), torch.where(mask, phi, -inf).amax(dim=(0, 3))


def merge_ranges(a: tuple[Tensor, Tensor], b: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    """The range of the union of two data sets."""
    return torch.minimum(a[0], b[0]), torch.maximum(a[1], b[1])


Chunk = tuple[Tensor, Tensor | None, Tensor, Tensor | None]  # (phi, feat, target, valid)


@torch.no_grad()
def fit_readout(dual_map: ReluSliceDualMap, chunks: Iterable[Chunk], *, ridge: float = 1e-6) -> dict[str, list[float]]:
    """Least-squares readout with the networks fixed (at their initialisation, or wherever they are).

    Accumulates ``G = D^T D (h, C, C)`` and ``c = D^T t`` in fp64 over the chunks
    ``(phi, feat, target (b, h, n), valid)`` (``target`` centred over valid queries,
    like the closure target), then solves ``(G + ridge diag(G)) coef = c`` with
    :func:`~asap.attention.least_squares.solve_normal_equations` (Cholesky, least
    norm where singular, residual checked; a training R2 below -1 is refused). The ridge is relative to each column's own energy, so it means
    the same whatever the scales of the potentials and features. Writes
    ``coef``, sets ``fitted`` and returns per-head ``r2`` and ``rss`` on the chunks.
    """
    if ridge < 0 or not math.isfinite(ridge):
        raise ValueError(f"ridge must be a finite number >= 0, got {ridge}")
    h, c = dual_map.num_heads, dual_map.num_design
    gram = torch.zeros(h, c, c, dtype=torch.float64)
    cross = torch.zeros(h, c, dtype=torch.float64)
    t_sq, t_sum, count = (torch.zeros(h, dtype=torch.float64) for _ in range(3))
    for phi, feat, target, valid in chunks:
        d = dual_map.design(phi, feat, valid=valid).double().cpu()
        t = target.detach().double().cpu()
        if t.shape != (d.shape[0], h, d.shape[3]):
            raise ValueError(f"target must be (b, h, n) = {(d.shape[0], h, d.shape[3])}, got {tuple(t.shape)}")
        w = torch.ones_like(t) if valid is None else valid.detach().cpu().double().expand_as(t)
        t = t * w
        gram += torch.einsum("bhcn,bhen->hce", d, d)
        cross += torch.einsum("bhcn,bhn->hc", d, t)
        t_sq += (t * t).sum(dim=(0, 2))
        t_sum += t.sum(dim=(0, 2))
        count += w.sum(dim=(0, 2))
    if bool((count == 0).any()):
        raise ValueError("cannot fit the ReLU dual map: no valid calibration token for at least one head")
    diag = gram.diagonal(dim1=-2, dim2=-1)
    # a tiny absolute floor keeps all-zero columns (a slice that never left the clamp) solvable
    floor = 1e-12 * diag.mean(dim=-1, keepdim=True).clamp(min=torch.finfo(torch.float64).tiny)
    system = gram + torch.diag_embed(ridge * diag + floor)
    # Cholesky, least norm where not positive definite (ridge 0 on collinear columns), residual checked
    coef = solve_normal_equations(system, cross, what="ReLU dual map read-out")
    rss, r2 = residual_and_r2(gram, cross, t_sq, t_sum, count, coef)
    check_training_r2(r2, what="ReLU dual map read-out")
    dual_map.coef.copy_(coef.to(dual_map.coef.dtype))
    dual_map.fitted.fill_(True)
    return {"r2": r2.tolist(), "rss": rss.tolist()}


Predictor = Callable[..., Tensor]


def refine(
    dual_map: ReluSliceDualMap,
    objective: Callable[[Predictor], Tensor],
    *,
    steps: int = 200,
    optimizer: str = "adam",
    lr: float = 1e-2,
    train_peaks: bool = True,
    train_readout: bool = True,
    held_out: Callable[[Predictor], Tensor] | None = None,
) -> dict[str, object]:
    """Gradient refinement of the peaks and the readout on a differentiable ``objective``.

    ``objective(predict)`` returns a scalar loss, where ``predict(phi, feat=None, *,
    valid=None) -> f_hat (b, h, n)`` evaluates the map at the parameters being
    trained (the coordinator's KL or entropic-dual objective wraps it). Peaks are
    trained through their raw values, so every iterate stays on the manifold
    (exactly ``2^k`` pieces per network, convex stacks). The readout is trained
    relative to its per-head scale, so ``lr`` is a relative step for it.
    ``optimizer``: ``"adam"`` (``steps`` steps) or ``"lbfgs"`` (``steps`` inner
    iterations, strong Wolfe line search). The lowest-loss iterate is kept, and
    written back only if it beats the starting point on ``held_out`` (or on
    ``objective`` when there is none). Returns the loss history and the decision.
    """
    if optimizer not in ("adam", "lbfgs"):
        raise ValueError(f"optimizer must be 'adam' or 'lbfgs', got {optimizer!r}")
    if steps < 1 or not (lr > 0):
        raise ValueError(f"steps must be >= 1 and lr > 0, got steps={steps}, lr={lr}")
    raw0, coef0 = dual_map.raw_peaks.detach().clone(), dual_map.coef.detach().clone()
    unit = coef0.abs().amax(dim=-1, keepdim=True).clamp(min=1e-6)  # (h, 1): readout scale per head
    raw = raw0.clone().requires_grad_(train_peaks)
    rel = (coef0 / unit).requires_grad_(train_readout)
    params = [p for p, on in ((raw, train_peaks), (rel, train_readout)) if on]
    if not params:
        raise ValueError("refine: nothing to train (train_peaks and train_readout are both False)")

    def make_predict(raw_t: Tensor, coef_t: Tensor) -> Predictor:
        def predict(phi: Tensor, feat: Tensor | None = None, *, valid: Tensor | None = None) -> Tensor:
            return dual_map.predict(dual_map.design(phi, feat, valid=valid, raw_peaks=raw_t), coef=coef_t)
        return predict

    def loss_now() -> Tensor:
        return objective(make_predict(raw, rel * unit))

    history: list[float] = []
    best = (float("inf"), raw0, coef0)

    def record(loss: Tensor) -> None:
        nonlocal best
        value = float(loss.detach())
        history.append(value)
        if math.isfinite(value) and value < best[0]:
            best = (value, raw.detach().clone(), (rel * unit).detach().clone())

    if optimizer == "adam":
        opt = torch.optim.Adam(params, lr=lr)
        for _ in range(steps):
            opt.zero_grad()
            loss = loss_now()
            record(loss)
            loss.backward()
            opt.step()
    else:
        opt = torch.optim.LBFGS(params, lr=1.0, max_iter=steps, line_search_fn="strong_wolfe")

        def closure() -> Tensor:
            opt.zero_grad()
            loss = loss_now()
            record(loss)
            loss.backward()
            return loss

        opt.step(closure)
    with torch.no_grad():
        record(loss_now())  # the final iterate
        check = held_out or objective
        before = float(check(make_predict(raw0, coef0)))
        after = float(check(make_predict(best[1], best[2])))
        kept = math.isfinite(after) and after < before
        if kept:
            dual_map.raw_peaks.copy_(best[1])
            dual_map.coef.copy_(best[2])
    return {"loss": history, "before": before, "after": after, "kept": kept}
