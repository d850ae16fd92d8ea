"""Throw a table of bad inputs at asap's three surfaces and record how each one was answered (issue 12).

Surfaces:

* ``attention``: the public attention functions (``softmax_attention``, ``sinkhorn_attention``,
  ``asap_attention``, ``esp_attention``), ``build_operator`` and ``MultiheadAttention``: strided,
  transposed, sliced, expanded and head-strided layouts, padding as 4-D masks and as ``(b, n)`` token
  masks, ``eps`` / ``scale`` / ``n_iters`` that are inf, NaN, bools or out of range, empty dims,
  masks of the wrong kind, shape or dtype, mismatched shapes and dtypes, fp16/bf16 with large scores;
* ``loaders``: a trained run's ``config.json`` and weights (``asap.train.load_model``, and the file list
  ``asap compile`` copies) and a compiled artifact's ``manifest.json`` and weights
  (``asap.compile.load_compiled``): path escapes in the tokenizer and weights names, malformed and deeply
  nested JSON, fields of the wrong type, shapes that lie, NaN weights with the hash re-signed, flipped
  and truncated bytes;
* ``cli``: ``asap.cli.main.main`` in-process (stdout and stderr captured), and three commands in a
  subprocess: bad options of ``train`` / ``eval`` / ``compile`` / ``report``, mistyped paths, an
  ``--out`` onto or inside a run or an artifact.

Each case is answered by one outcome:

* ``exit_2``: (cli) exit status 2, exactly one line on stderr (no traceback), nothing written or changed
  anywhere under the sandbox (every file's bytes compared before and after);
* ``refused``: (library) a ``ValueError`` / ``TypeError`` (attention) or an ``asap.errors.AsapError``
  (loaders: the project's named errors, which name the file) with a one-line message;
* ``correct``: the input is valid (an odd layout, an empty batch, low precision) and the result equals
  the fp64 reference on the same values: ``max |out - ref| <= 2e-5`` in fp32; for fp16/bf16 (computed in
  fp32 internally) ``<= 2 max(err_plain, err_fp32) + ulp/2``, where ``err_plain`` is plain PyTorch
  softmax attention's error in the same dtype and temperature and ``err_fp32`` the same call's in fp32;
* ``WRONG``: anything else: a wrong or non-finite result, a bad input accepted, another exception type
  (``ZeroDivisionError``, ``AttributeError``, a raw ``RuntimeError``, ...), a CLI exit other than 2, a
  second stderr line, a file written or changed by a refused command.

A case also records whether its outcome is the expected one (bad input refused, valid input computed
correctly). Everything is seeded; the sandbox path is written as ``<sandbox>`` in messages, so reruns on
one machine give the same cases, outcomes and messages. Under a minute on two CPU cores (most of it imports
and the tiny run the loader and CLI cases aim at)::

    python scripts/reliability_probe.py --out results/reliability/reliability.json

``--surfaces`` and ``--limit`` run a subset (the smoke test uses them).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import hashlib
import io
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

SCHEMA = "asap.scripts.reliability_probe/1"
SURFACES = ("attention", "loaders", "cli")
OUTCOMES = ("exit_2", "refused", "correct", "WRONG")
FP32_ATOL = 2e-5

# ============================================================================================== the case table


@dataclass
class Case:
    """One input thrown at one surface.

    ``expect`` is ``"refuse"`` (a bad input: must be refused) or ``"compute"`` (a valid input in an odd
    form: must give the fp64 reference's answer). ``run()`` returns ``(ok, detail)`` for a computed
    result, or raises (library) / returns ``None`` after setting the CLI fields (cli).
    """

    surface: str
    input: str
    expect: str
    run: Callable[[], Any]
    needs_sandbox: bool = False


@dataclass
class Record:
    surface: str
    input: str
    expect: str
    outcome: str
    as_expected: bool
    message: str

    def as_dict(self) -> dict[str, Any]:
        return {"surface": self.surface, "input": self.input, "expect": self.expect, "outcome": self.outcome,
                "as_expected": self.as_expected, "message": self.message}


@dataclass
class Sandbox:
    """A temporary folder with a trained run ``R``, a copy ``other``, an artifact ``art`` and a plain folder."""

    root: Path
    run: Path
    other: Path
    art: Path
    scrub: list[str] = field(default_factory=list)

    def clean(self, text: str) -> str:
        for path in self.scrub:
            text = text.replace(path, "<sandbox>")
        return text


def first_line(text: object) -> str:
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    return lines[0] if lines else ""


# ============================================================================================ attention surface


def _base(dtype: torch.dtype, *, seed: int, b: int = 2, h: int = 3, n: int = 6, d: int = 8, scale: float = 1.0):
    """``q, k, v (b, h, n, d)`` and ``f_hat (b, h, n)``: fp64 draws rounded to ``dtype``."""
    gen = torch.Generator().manual_seed(seed)
    q, k = (scale * torch.randn(b, h, n, d, generator=gen, dtype=torch.float64) for _ in range(2))
    v = torch.randn(b, h, n, d, generator=gen, dtype=torch.float64)
    f = torch.randn(b, h, n, generator=gen, dtype=torch.float64)
    return [t.to(dtype) for t in (q, k, v, f)]


def relayout(t: torch.Tensor, layout: str) -> torch.Tensor:
    """The same values in another memory layout (``expanded`` broadcasts head 0 with stride 0)."""
    if layout == "transposed":  # last dim not unit-stride
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)
    if layout == "sliced":  # a view t[..., ::2] of a wider tensor
        big = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype)
        big[..., ::2] = t
        return big[..., ::2]
    if layout == "expanded":  # stride 0 along heads
        return t[:, :1].expand(*t.shape)
    if layout == "head-strided":  # (b, n, h, d) storage seen as (b, h, n, d): unit last dim, not contiguous
        return t.transpose(1, 2).contiguous().transpose(1, 2)
    raise ValueError(layout)


def _attention(method: str, q, k, v, f, *, reference: bool = False, **kw):
    """One public function (or its fp64 reference) with the probe's fixed options."""
    from asap.attention import asap_attention, esp_attention, sinkhorn_attention, softmax_attention
    from asap.attention.esp import esp_attention_reference
    from asap.attention.reference import (
        asap_attention_reference,
        sinkhorn_attention_reference,
        softmax_attention_reference,
    )

    if method == "softmax":
        return (softmax_attention_reference if reference else softmax_attention)(q, k, v, **kw)
    if method == "sinkhorn":
        kw.setdefault("n_iters", 3)
        kw.setdefault("eps", 0.7)
        return (sinkhorn_attention_reference if reference else sinkhorn_attention)(q, k, v, **kw)
    if method == "esp":
        kw.setdefault("tau_sort", 0.05)
        return (esp_attention_reference if reference else esp_attention)(q, k, v, **kw)
    kw.setdefault("eps", 0.7)
    return (asap_attention_reference if reference else asap_attention)(q, k, v, f, **kw)


def _compare(out: torch.Tensor, ref: torch.Tensor, atol: float) -> tuple[bool, str]:
    if out.shape != ref.shape:
        return False, f"shape {tuple(out.shape)}, reference {tuple(ref.shape)}"
    if not bool(torch.isfinite(out).all()):
        return False, "non-finite output"
    err = float((out.double() - ref.double()).abs().max()) if out.numel() else 0.0
    return err <= atol, f"max |out - fp64 ref| = {err:.1e} (limit {atol:.0e})"


def _padding(b: int = 2, n: int = 6) -> torch.Tensor:
    return torch.arange(n)[None] < torch.tensor([n, n - 2] + [n] * (b - 2))[:b, None]


def _layout_case(method: str, layout: str, masking: str, dtype=torch.float32, grad: bool = False):
    def run():
        from asap.transport.masks import key_padding_to_attn_mask

        q, k, v, f = _base(dtype, seed=len(layout) + 7 * len(method))
        valid = _padding()
        mask = key_padding_to_attn_mask(valid) if masking != "none" else None
        kw = {"padding_mask": valid} if masking == "token mask" else ({"attn_mask": mask} if mask is not None else {})
        args = [relayout(t, layout) for t in (q, k, v, f)]
        if grad:
            args = [t.detach().requires_grad_(True) for t in args]
        out = _attention(method, *args, **kw)
        values = [t.detach().double() for t in args]  # the reference sees the same values, stored contiguously
        reference = _attention(method, *values, reference=True, **({"attn_mask": mask} if mask is not None else {}))
        ok, detail = _compare(out, reference, FP32_ATOL if dtype == torch.float32 else 1e-10)
        if ok and grad:  # the gradients equal those of contiguous copies
            copies = [t.detach().contiguous().requires_grad_(True) for t in args]
            expected = _attention(method, *copies, **kw)
            used = 4 if method == "asap" else 3
            g1 = torch.autograd.grad(out.sum(), args[:used])
            g2 = torch.autograd.grad(expected.sum(), copies[:used])
            gerr = max(float((a - b).abs().max()) for a, b in zip(g1, g2))
            ok, detail = gerr <= 1e-4, detail + f"; gradients vs contiguous {gerr:.1e}"
        return ok, detail

    what = f"{method}: {layout} q, k, v{', f_hat' if method == 'asap' else ''}, {masking}"
    return Case("attention", what + (f", {str(dtype)[6:]}" if dtype != torch.float32 else "") + (", autograd" if grad else ""),
                "compute", run)  # fmt: skip


def _module_case(method: str):
    def run():
        from asap.attention import MultiheadAttention

        torch.manual_seed(0)
        options = {"num_slices": 4} if method == "asap" else ({"tau_sort": 0.05} if method == "esp" else {})
        mha = MultiheadAttention(24, num_heads=3, method=method, **options)
        if method == "asap":
            mha.operator.dual_map.set_coefficients(torch.randn(3, 4))
        ref_mha = copy.deepcopy(mha).double()
        x = torch.randn(2, 6, 24, dtype=torch.float64)
        valid = _padding()
        with torch.no_grad():
            out = mha(relayout(x.float().unsqueeze(1), "transposed").squeeze(1), padding_mask=valid)
            ref = ref_mha(x.float().double(), padding_mask=valid)
        return _compare(out, ref, FP32_ATOL)

    return Case("attention", f"MultiheadAttention({method}): transposed x (b, n, dim), padding_mask", "compute", run)


def _empty_case(method: str, b: int, h: int):
    def run():
        q, k, v, f = (t[:b, :h] for t in _base(torch.float32, seed=1))
        out = _attention(method, q, k, v, f)
        expected = (b, h, 6, 8)
        return tuple(out.shape) == expected, f"shape {tuple(out.shape)} (expected {expected})"

    return Case("attention", f"{method}: empty dim b={b}, h={h}", "compute", run)


def _refuse_case(what: str, call: Callable[[], Any]) -> Case:
    return Case("attention", what, "refuse", call)


def _low_precision_case(method: str, dtype: torch.dtype, *, eps: float, size: float):
    def run():
        from asap.attention import softmax_attention
        from asap.attention.reference import softmax_attention_reference

        q, k, _, f = _base(dtype, seed=11, n=16, d=8, scale=size)
        eye = torch.eye(16, dtype=dtype).expand(2, 3, 16, 16)  # v = I: the output is the attention matrix
        temperature = 8**-0.5 / eps
        opts = {"scale": temperature} if method == "softmax" else {"eps": eps}

        def call(in_dtype: torch.dtype, *, reference: bool = False) -> torch.Tensor:
            # the dual map's output is fp32 for fp16/bf16 inputs (what the operators pass); fp64 for the reference
            f_hat = f.to(torch.float64 if in_dtype == torch.float64 else torch.float32)
            return _attention(method, q.to(in_dtype), k.to(in_dtype), eye.to(in_dtype), f_hat, reference=reference,
                              **opts)  # fmt: skip

        with torch.no_grad():
            out, out32, ref = call(dtype), call(torch.float32), call(torch.float64, reference=True)
            plain = softmax_attention(q, k, eye, scale=temperature)
            plain_ref = softmax_attention_reference(q.double(), k.double(), eye.double(), scale=temperature)
        if not bool(torch.isfinite(out).all()):
            return False, "non-finite output"
        err = float((out.double() - ref).abs().max())
        err32 = float((out32.double() - ref).abs().max())
        err_plain = float((plain.double() - plain_ref).abs().max())
        limit = 2 * max(err_plain, err32) + 0.5 * torch.finfo(dtype).eps
        rows = float(out.double().sum(-1).min())
        logits = float((q.double() @ k.double().transpose(-1, -2)).abs().max()) * temperature
        detail = (f"max |out - fp64 ref| = {err:.1e} (limit {limit:.1e}: plain softmax {err_plain:.1e}, "
                  f"fp32 {err32:.1e}); min row sum {rows:.3f}; max |S/eps| = {logits:.3g}")  # fmt: skip
        return err <= limit and rows > 0.5, detail

    scores = "large scores (|S/eps| > 65504)" if size > 10 else "unit-scale scores"
    return Case("attention", f"{method}: {str(dtype)[6:]}, eps={eps:g}, {scores}", "compute", run)


def attention_cases() -> list[Case]:
    from asap.attention import EspOperator, MultiheadAttention, build_operator, esp_attention
    from asap.transport.masks import key_padding_to_attn_mask

    methods = ("softmax", "sinkhorn", "asap", "esp")
    cases: list[Case] = []
    for method in methods:
        for layout in ("transposed", "sliced", "expanded", "head-strided"):
            for masking in ("none", "4-D padding mask"):
                cases.append(_layout_case(method, layout, masking))
        cases.append(_layout_case(method, "transposed", "token mask"))
    cases.append(_layout_case("asap", "transposed", "none", dtype=torch.float64))
    cases.append(_layout_case("asap", "sliced", "none", grad=True))
    cases.append(_layout_case("sinkhorn", "transposed", "4-D padding mask", grad=True))
    cases += [_module_case(m) for m in methods]
    cases += [_empty_case(m, b, h) for m in methods for b, h in ((0, 3), (2, 0))]

    def qkvf(**kw):
        return _base(torch.float32, seed=3, **kw)

    def refuse(method: str, what: str, **kw):
        return _refuse_case(f"{method}: {what}", lambda: _attention(method, *qkvf(), **kw))

    for method in methods:
        cases.append(_refuse_case(f"{method}: head size d = 0", lambda m=method: _attention(m, *qkvf(d=0))))
        for name, value in (("inf", math.inf), ("NaN", math.nan), ("True", True)):
            cases.append(refuse(method, f"scale = {name}", scale=value))
        cases.append(refuse(method, "float (additive) attn_mask", attn_mask=torch.zeros(6, 6)))
        cases.append(refuse(method, "attn_mask of shape (6, 5)", attn_mask=torch.ones(6, 5, dtype=torch.bool)))
        cases.append(refuse(method, "int attn_mask", attn_mask=torch.ones(6, 6, dtype=torch.int64)))
        cases.append(refuse(method, "padding_mask of shape (2, 5)", padding_mask=torch.ones(2, 5, dtype=torch.bool)))
        cases.append(refuse(method, "float padding_mask", padding_mask=torch.ones(2, 6)))
        cases.append(refuse(method, "attn_mask and padding_mask together", padding_mask=_padding(),
                            attn_mask=key_padding_to_attn_mask(_padding())))  # fmt: skip

        def mismatched_d(m=method):
            q, k, v, f = qkvf()
            return _attention(m, q, k[..., :4], v, f)

        def mixed_dtype(m=method):
            q, k, v, f = qkvf()
            return _attention(m, q, k.double(), v, f)

        def int_inputs(m=method):
            q, k, v, f = qkvf()
            return _attention(m, q.long(), k.long(), v.long(), f)

        cases += [_refuse_case(f"{method}: q and k of different head sizes", mismatched_d),
                  _refuse_case(f"{method}: q fp32, k fp64", mixed_dtype),
                  _refuse_case(f"{method}: integer q, k, v", int_inputs)]  # fmt: skip
    cases.append(refuse("softmax", "scale = -2", scale=-2.0))
    for method in ("sinkhorn", "asap"):
        for name, value in (("inf", math.inf), ("NaN", math.nan), ("True", True), ("-1", -1.0), ("0", 0.0)):
            cases.append(refuse(method, f"eps = {name}", eps=value))
    for name, value in (("True", True), ("0", 0), ("2.5", 2.5)):
        cases.append(refuse("sinkhorn", f"n_iters = {name}", n_iters=value))
    cases.append(_refuse_case("sinkhorn: sequence length n = 0", lambda: _attention("sinkhorn", *qkvf(n=0))))
    for method in ("sinkhorn", "esp", "asap"):
        cases.append(refuse(method, "is_causal=True (no doubly-stochastic causal attention)", is_causal=True))
    cases.append(_refuse_case("asap: f_hat of shape (2, 3, 5)", lambda: _attention("asap", *qkvf()[:3], qkvf()[3][..., :5])))

    arbitrary = torch.rand(2, 1, 6, 6, generator=torch.Generator().manual_seed(0)) > 0.4
    arbitrary[..., range(6), range(6)] = True
    eye = torch.eye(6).expand(2, 3, 6, 6)
    q, k = qkvf()[:2]
    cases += [
        _refuse_case("esp_attention: mask forbidding pairs of valid tokens", lambda: esp_attention(q, k, eye, attn_mask=arbitrary)),
        _refuse_case("EspOperator(): mask forbidding pairs of valid tokens", lambda: EspOperator()(q, k, eye, attn_mask=arbitrary)),
        _refuse_case("build_operator('esp'): mask forbidding pairs of valid tokens",
                     lambda: build_operator("esp", num_heads=3, head_dim=8)(q, k, eye, attn_mask=arbitrary)),
        _refuse_case("build_operator('esp'): causal (tril) mask",
                     lambda: build_operator("esp", num_heads=3, head_dim=8)(q, k, eye, attn_mask=torch.ones(6, 6, dtype=torch.bool).tril())),
    ]  # fmt: skip
    for what, kwargs in (
        ("num_heads = 0", {"dim": 8, "num_heads": 0}), ("num_heads = -2", {"dim": 8, "num_heads": -2}),
        ("num_heads = True", {"dim": 8, "num_heads": True}), ("dim = 0", {"dim": 0, "num_heads": 2}),
        ("dim 8 with 3 heads", {"dim": 8, "num_heads": 3}), ("method 'nope'", {"dim": 8, "num_heads": 2, "method": "nope"}),
        ("sinkhorn with scale = -1", {"dim": 8, "num_heads": 2, "method": "sinkhorn", "scale": -1.0}),
        ("sinkhorn with eps = inf", {"dim": 8, "num_heads": 2, "method": "sinkhorn", "eps": math.inf}),
    ):  # fmt: skip
        cases.append(_refuse_case(f"MultiheadAttention({what})",
                                  lambda kw=kwargs: MultiheadAttention(kw.pop("dim"), **kw)))  # fmt: skip
    for what, call in (
        ("build_operator('nope')", lambda: build_operator("nope", num_heads=2, head_dim=4)),
        ("build_operator('sinkhorn', n_iters=0)", lambda: build_operator("sinkhorn", num_heads=2, head_dim=4, n_iters=0)),
        ("build_operator('asap', eps=inf)", lambda: build_operator("asap", num_heads=2, head_dim=4, eps=math.inf)),
        ("build_operator('sinkhorn', unknown option)",
         lambda: build_operator("sinkhorn", num_heads=2, head_dim=4, bogus=1)),
        ("build_operator('asap', num_slices=0)", lambda: build_operator("asap", num_heads=2, head_dim=4, num_slices=0)),
    ):  # fmt: skip
        cases.append(_refuse_case(what, call))
    for method, dtype, eps, size in (
        ("asap", torch.float16, 0.1, 1.0), ("asap", torch.bfloat16, 0.1, 1.0), ("asap", torch.float16, 1.0, 1.0),
        ("asap", torch.bfloat16, 1.0, 1.0), ("asap", torch.float16, 0.01, 30.0), ("asap", torch.bfloat16, 0.01, 30.0),
        ("sinkhorn", torch.float16, 0.01, 30.0), ("sinkhorn", torch.bfloat16, 0.1, 1.0),
        ("softmax", torch.float16, 0.01, 30.0),
    ):  # fmt: skip
        cases.append(_low_precision_case(method, dtype, eps=eps, size=size))
    return cases


# ============================================================================================== loaders surface


def _edit_json(path: Path, edit: Callable[[dict], Any]) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def _fresh_copy(src: Path, sandbox: Sandbox, name: str) -> Path:
    dst = sandbox.root / "scratch" / name
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst)
    return dst


def _load_run(path: Path):
    from asap.train import load_model

    return load_model(path)


def _compile_files(path: Path):
    from asap.runs import load_teacher

    return load_teacher(path).extra_files()


def _load_artifact(path: Path):
    from asap.compile import load_compiled

    return load_compiled(path)


def _nan_weights(weights: Path, key_part: str) -> None:
    """Put a NaN into the first tensor whose name contains ``key_part`` and save it with a fresh hash."""
    from asap.train.checkpoint import load_tensors, save_tensors

    tensors, meta = load_tensors(weights)
    name = next(k for k in sorted(tensors) if key_part in k and tensors[k].is_floating_point())
    tensors[name].view(-1)[0] = float("nan")
    save_tensors(weights, tensors, metadata=meta, record_hash=True)


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def loader_cases() -> list[Case]:
    from asap.compile.artifact import MANIFEST_FILE, WEIGHTS_FILE, sha256_file
    from asap.train.checkpoint import CONFIG_FILE, MODEL_FILE, load_tensors, save_tensors

    run_edits: list[tuple[str, Callable[[Path], Any], Callable[[Path], Any]]] = [
        ("config.json: data.tokenizer = '/etc/hostname' (files asap compile copies)",
         lambda r: _edit_json(r / CONFIG_FILE, lambda c: c["data"].update(tokenizer="/etc/hostname")), _compile_files),
        ("config.json: data.tokenizer = '../../x'",
         lambda r: _edit_json(r / CONFIG_FILE, lambda c: c["data"].update(tokenizer="../../x")), _compile_files),
        ("config.json: data.tokenizer = 'sub/tok.json'",
         lambda r: _edit_json(r / CONFIG_FILE, lambda c: c["data"].update(tokenizer="sub/tok.json")), _compile_files),
        ("config.json: truncated JSON", lambda r: _truncate(r / CONFIG_FILE), _load_run),
        ("config.json: 100,000-deep nesting", lambda r: (r / CONFIG_FILE).write_text("[" * 100_000 + "]" * 100_000), _load_run),
        ("config.json: bytes that are not UTF-8", lambda r: (r / CONFIG_FILE).write_bytes(b"\xff\xfe{}"), _load_run),
        ("config.json: a JSON list", lambda r: (r / CONFIG_FILE).write_text("[1, 2]"), _load_run),
        ("config.json: model = null", lambda r: _edit_json(r / CONFIG_FILE, lambda c: c.update(model=None)), _load_run),
        ("config.json: model.dim = '16' (a string)",
         lambda r: _edit_json(r / CONFIG_FILE, lambda c: c["model"].update(dim="16")), _load_run),
        ("config.json: model.dim missing", lambda r: _edit_json(r / CONFIG_FILE, lambda c: c["model"].pop("dim")), _load_run),
        ("config.json: model.depth = 10**6", lambda r: _edit_json(r / CONFIG_FILE, lambda c: c["model"].update(depth=10**6)), _load_run),
        ("config.json: train.grad_clip = -1",
         lambda r: _edit_json(r / CONFIG_FILE, lambda c: c["train"].update(grad_clip=-1)), _load_run),
        ("config.json missing", lambda r: (r / CONFIG_FILE).unlink(), _load_run),
        ("config.json claims dim = 2**20 (weights header without a config)",
         lambda r: (_edit_json(r / CONFIG_FILE, lambda c: c["model"].update(dim=2**20)),
                    save_tensors(r / MODEL_FILE, load_tensors(r / MODEL_FILE)[0])), _load_run),
        ("model.safetensors: a NaN weight, hash re-signed", lambda r: _nan_weights(r / MODEL_FILE, "weight"), _load_run),
        ("model.safetensors: one byte flipped", lambda r: _flip_byte(r / MODEL_FILE), _load_run),
        ("model.safetensors: truncated to half", lambda r: _truncate(r / MODEL_FILE), _load_run),
        ("model.safetensors: 1 MiB of zeros", lambda r: (r / MODEL_FILE).write_bytes(b"\0" * (1 << 20)), _load_run),
        ("model.safetensors missing", lambda r: (r / MODEL_FILE).unlink(), _load_run),
        ("a mistyped run folder", lambda r: None, lambda r: _load_run(r.parent / (r.name + "_typo"))),
    ]  # fmt: skip

    def layer(m):
        return m["compiled_layers"][0]

    def manifest(edit):
        return lambda a: _edit_json(a / MANIFEST_FILE, edit)

    def resign(a: Path) -> None:
        _edit_json(a / MANIFEST_FILE, lambda m: m["weights"].update(sha256=sha256_file(a / WEIGHTS_FILE)))

    art_edits: list[tuple[str, Callable[[Path], Any]]] = [
        ("manifest weights.file = '../R/model.safetensors'",
         manifest(lambda m: m["weights"].update(file="../R/model.safetensors"))),
        ("manifest weights.file = '/etc/passwd'", manifest(lambda m: m["weights"].update(file="/etc/passwd"))),
        ("manifest weights.file = 'sub/model.safetensors'", manifest(lambda m: m["weights"].update(file="sub/model.safetensors"))),
        ("manifest weights.file = '..'", manifest(lambda m: m["weights"].update(file=".."))),
        ("manifest weights.file = null", manifest(lambda m: m["weights"].update(file=None))),
        ("manifest weights = 'model.safetensors' (a string)", manifest(lambda m: m.update(weights="model.safetensors"))),
        ("manifest run_config.data.tokenizer = '/etc/hostname'",
         manifest(lambda m: m.update(run_config={"data": {"dataset": "digits", "tokenizer": "/etc/hostname"}}))),
        ("manifest model_config = null", manifest(lambda m: m.update(model_config=None))),
        ("manifest compiled_layers = null", manifest(lambda m: m.update(compiled_layers=None))),
        ("manifest compiled_layers = {}", manifest(lambda m: m.update(compiled_layers={}))),
        ("manifest layer name = 3", manifest(lambda m: layer(m).update(name=3))),
        ("manifest layer eps = 'abc'", manifest(lambda m: layer(m).update(eps="abc"))),
        ("manifest layer eps = -1", manifest(lambda m: layer(m).update(eps=-1))),
        ("manifest layer scale = -1", manifest(lambda m: layer(m).update(scale=-1))),
        ("manifest layer slices missing", manifest(lambda m: layer(m).pop("slices"))),
        ("manifest layer slices.seed = 'abc'", manifest(lambda m: layer(m)["slices"].update(seed="abc"))),
        ("manifest claims model_config.dim = 65536 (lying shape)", manifest(lambda m: m["model_config"].update(dim=65536))),
        ("manifest: truncated JSON", lambda a: _truncate(a / MANIFEST_FILE)),
        ("manifest: 100,000-deep nesting", lambda a: (a / MANIFEST_FILE).write_text("[" * 100_000 + "]" * 100_000)),
        ("manifest missing", lambda a: (a / MANIFEST_FILE).unlink()),
        ("weights: NaN dual-map coefficient, hash re-signed",
         lambda a: (_nan_weights(a / WEIGHTS_FILE, "dual_map.coef"), resign(a))),
        ("weights: one byte flipped", lambda a: _flip_byte(a / WEIGHTS_FILE)),
        ("weights: truncated to half", lambda a: _truncate(a / WEIGHTS_FILE)),
        ("weights: not a safetensors file (hash re-signed)",
         lambda a: ((a / WEIGHTS_FILE).write_bytes(b"\0" * 4096), resign(a))),
    ]  # fmt: skip

    cases = []
    for what, edit, load in run_edits:
        def run(edit=edit, load=load):
            sandbox = _SANDBOX[0]
            target = _fresh_copy(sandbox.run, sandbox, "run")
            edit(target)
            return load(target)

        cases.append(Case("loaders", f"run: {what}", "refuse", run, needs_sandbox=True))
    for what, edit in art_edits:
        def run(edit=edit):
            sandbox = _SANDBOX[0]
            target = _fresh_copy(sandbox.art, sandbox, "art")
            edit(target)
            return _load_artifact(target)

        cases.append(Case("loaders", f"artifact: {what}", "refuse", run, needs_sandbox=True))
    return cases


# ================================================================================================== cli surface

TINY = ["--dataset", "digits", "--limit", "200", "--dim", "16", "--depth", "1", "--heads", "2",
        "--batch-size", "16", "--device", "cpu", "--no-progress"]  # fmt: skip


def _tree(root: Path) -> dict[str, str]:
    """Every path under ``root`` with the sha256 of its bytes (files) or a marker (folders, links)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            rel = path.relative_to(root).as_posix()
            if path.is_symlink():
                out[rel] = "link:" + os.readlink(path)
            elif path.is_dir():
                out[rel] = "dir"
            else:
                out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def _in_process(argv: list[str]) -> tuple[int | str, str]:
    from asap.cli.main import main

    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            code: int | str = main(argv)
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else 1
        except BaseException as exc:  # a bug: report it, keep probing
            code = f"raised {type(exc).__name__}"
            err.write(f"{type(exc).__name__}: {exc}\n")
    return code, err.getvalue()


def _subprocess(argv: list[str]) -> tuple[int | str, str]:
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    done = subprocess.run([sys.executable, "-m", "asap", *argv], capture_output=True, text=True, env=env, timeout=300)
    return done.returncode, done.stderr


def _cli_case(argv: list[str], *, via: str = "in-process") -> Case:
    """``asap ARGV`` (``{S}`` = the sandbox) must exit 2 with one stderr line and change nothing under the sandbox."""

    def run():
        sandbox = _SANDBOX[0]
        args = [a.replace("{S}", str(sandbox.root)) for a in argv]
        before = _tree(sandbox.root)
        code, err = (_subprocess if via == "subprocess" else _in_process)(args)
        changed = sorted({path for path, _ in set(before.items()) ^ set(_tree(sandbox.root).items())})
        lines = [line for line in err.strip().splitlines() if line.strip()]
        problems = [text for bad, text in ((code != 2, f"exit {code}"), (len(lines) != 1, f"{len(lines)} stderr lines"),
                                           ("Traceback" in err, "traceback"), (bool(changed), f"changed {changed[:3]}"))
                    if bad]  # fmt: skip
        return _CliResult(not problems, "; ".join(problems), sandbox.clean(lines[0] if lines else ""))

    shown = "asap " + " ".join(argv).replace("{S}/", "").replace("{S}", "<sandbox>")
    return Case("cli", shown + (" (subprocess)" if via == "subprocess" else ""), "refuse", run, needs_sandbox=True)


@dataclass
class _CliResult:
    ok: bool
    problems: str
    line: str


def cli_cases() -> list[Case]:
    train = lambda *extra: ["train", *TINY, *extra, "--out", "{S}/new_run"]  # noqa: E731
    compile_ = lambda *extra: ["compile", "{S}/R", "--calibration", "8", "--no-eval", "--quiet", *extra]  # noqa: E731
    table = [
        ("train", train("--grad-clip", "-1")), ("train", train("--min-lr-ratio", "-1")),
        ("train", train("--eps", "inf")), ("train", train("--lr", "nan")), ("train", train("--weight-decay", "-1")),
        ("train", train("--stop-after-steps", "0")), ("train", train("--patch-size", "0")),
        ("train", train("--eval-batch-size", "0")), ("train", train("--batch-size", "0")),
        ("train", train("--val-fraction", "0")), ("train", train("--dataset", "nope")),
        ("train", train("--method", "asap")), ("train", train("--dim", "15", "--heads", "2")),
        ("train", train("--attention-option", "bogus=1")),
        ("train", ["train", *TINY, "--out", "{S}/R"]), ("train", ["train", "--resume", "{S}/missing"]),
        ("train", ["train", "--resume", "{S}/plain"]), ("train", ["train", "--resume", "{S}/R", "--lr", "0.5"]),
        ("eval", ["eval", "{S}/R_typo"]), ("eval", ["eval", "{S}/R", "--batch-size", "0"]),
        ("eval", ["eval", "{S}/R", "--batch-size", "-5"]), ("eval", ["eval", "{S}/R", "--method-override", "asap"]),
        ("eval", ["eval", "{S}/R", "--method-override", "nope"]), ("eval", ["eval", "{S}/R", "--n-iters", "3"]),
        ("eval", ["eval", "{S}/plain"]),
        ("compile", compile_("--out", "{S}/R")), ("compile", compile_("--out", "{S}/R/compiled")),
        ("compile", compile_("--out", "{S}")), ("compile", compile_("--out", "{S}/other")),
        ("compile", compile_("--out", "{S}/art/compiled")),
        ("compile", compile_("--out", "{S}/plain")), ("compile", compile_("--out", "{S}/a_file")),
        ("compile", ["compile", "{S}/R_typo", "--calibration", "8", "--out", "{S}/c"]),
        ("compile", compile_("--out", "{S}/c", "--calibration", "0")),
        ("compile", compile_("--out", "{S}/c", "--layers", "a,b")),
        ("compile", compile_("--out", "{S}/c", "--layers", "99")), ("compile", compile_("--out", "{S}/c", "--slices", "0")),
        ("compile", compile_("--out", "{S}/c", "--ridge", "-1")), ("compile", compile_("--out", "{S}/c", "--ridge", "nan")),
        ("compile", compile_("--out", "{S}/c", "--holdout", "2")), ("compile", compile_("--out", "{S}/c", "--batch-size", "0")),
        ("report", ["report", "--results", "{S}/nowhere"]), ("report", ["report", "--results", "{S}/plain", "--out", "{S}/no/README.md"]),
        ("main", ["frobnicate"]), ("main", ["train", "--no-such-option"]), ("main", ["bench"]),
    ]  # fmt: skip
    cases = [_cli_case(argv) for _, argv in table]
    cases += [
        _cli_case(["train", *TINY, "--batch-size", "0", "--out", "{S}/new_run"], via="subprocess"),
        _cli_case(["eval", "{S}/R_typo"], via="subprocess"),
        _cli_case(["compile", "{S}/R", "--calibration", "8", "--out", "{S}/R"], via="subprocess"),
    ]
    return cases


# ==================================================================================================== the driver

_SANDBOX: list[Sandbox] = []


def make_sandbox(root: Path) -> Sandbox:
    """Train a tiny digits run (Sinkhorn K = 3), compile it, and lay out the folders the CLI cases aim at."""
    from asap.cli.main import main
    from asap.train import TrainConfig, train

    run = root / "R"
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train(TrainConfig(dataset="digits", out_dir=str(run), method="sinkhorn", n_iters=3, epochs=1, limit=64,
                          batch_size=32, dim=16, depth=1, num_heads=2, patch_size=4, progress=False, device="cpu",
                          seed=0))  # fmt: skip
        code = main(["compile", str(run), "--calibration", "16", "--slices", "2", "--out", str(root / "art"),
                     "--no-eval", "--quiet"])  # fmt: skip
    if code != 0:
        raise RuntimeError(f"could not compile the sandbox run (exit {code})")
    shutil.copytree(run, root / "other")
    (root / "plain").mkdir()
    (root / "plain" / "notes.txt").write_text("somebody's notes")
    (root / "a_file").write_text("x")
    return Sandbox(root, run, root / "other", root / "art", scrub=sorted({str(root.resolve()), str(root)}, key=len, reverse=True))


def classify(case: Case) -> Record:
    """Run one case and put its answer in one outcome class (module docstring)."""
    from asap.errors import AsapError

    clean = _SANDBOX[0].clean if _SANDBOX else (lambda s: s)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = case.run()
    except (ValueError, TypeError, AsapError) as err:
        named = isinstance(err, AsapError) or case.surface == "attention"
        message = clean(first_line(err))
        multi = len(str(err).strip().splitlines()) > 1
        if not named or not message or multi:
            why = "not a named asap error" if not named else ("empty message" if not message else "multi-line message")
            return Record(case.surface, case.input, case.expect, "WRONG", False,
                          f"{type(err).__name__} ({why}): {message}")  # fmt: skip
        return Record(case.surface, case.input, case.expect, "refused", case.expect == "refuse",
                      f"{type(err).__name__}: {message}")  # fmt: skip
    except Exception as err:  # noqa: BLE001 - any other exception is a bug: it is recorded, the probe goes on
        return Record(case.surface, case.input, case.expect, "WRONG", False,
                      f"{type(err).__name__}: {clean(first_line(err))}")  # fmt: skip
    if isinstance(result, _CliResult):
        outcome = "exit_2" if result.ok else "WRONG"
        message = result.line if result.ok else f"{result.problems}: {result.line}"
        return Record(case.surface, case.input, case.expect, outcome, result.ok, message)
    if case.expect == "refuse":
        return Record(case.surface, case.input, case.expect, "WRONG", False, "accepted: returned a result")
    ok, detail = result
    return Record(case.surface, case.input, case.expect, "correct" if ok else "WRONG", bool(ok), detail)


def all_cases(surfaces: tuple[str, ...]) -> list[Case]:
    makers = {"attention": attention_cases, "loaders": loader_cases, "cli": cli_cases}
    return [case for surface in surfaces for case in makers[surface]()]


def summarise(records: list[Record]) -> dict[str, Any]:
    counts = {s: {o: 0 for o in OUTCOMES} for s in SURFACES if any(r.surface == s for r in records)}
    for r in records:
        counts[r.surface][r.outcome] += 1
    tried = {s: sum(c.values()) for s, c in counts.items()}
    unexpected = [r.as_dict() for r in records if not r.as_expected]
    return {"counts": counts, "tried": tried, "total": len(records),
            "as_expected": sum(r.as_expected for r in records), "unexpected": unexpected}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="JSON to write (e.g. results/reliability/reliability.json)")
    parser.add_argument("--surfaces", default=",".join(SURFACES), help=f"comma-separated subset of {','.join(SURFACES)}")
    parser.add_argument("--limit", type=int, default=None, help="at most this many cases per surface (a smoke run)")
    args = parser.parse_args(argv)
    surfaces = tuple(s for s in args.surfaces.split(",") if s)
    if not surfaces or any(s not in SURFACES for s in surfaces):
        parser.error(f"--surfaces: choose among {','.join(SURFACES)}, got {args.surfaces!r}")
    if args.limit is not None and args.limit < 1:
        parser.error(f"--limit: must be >= 1, got {args.limit}")

    from asap.env import machine_info
    from asap.io import atomic_write_json, command_line

    torch.manual_seed(0)
    cases = all_cases(surfaces)
    if args.limit is not None:
        cases = [c for s in surfaces for c in [c for c in cases if c.surface == s][: args.limit]]
    records: list[Record] = []
    with tempfile.TemporaryDirectory(prefix="asap_probe_") as tmp:
        _SANDBOX.clear()
        if any(c.needs_sandbox for c in cases):
            _SANDBOX.append(make_sandbox(Path(tmp)))
        try:
            for case in cases:
                record = classify(case)
                records.append(record)
                flag = "" if record.as_expected else "   <-- UNEXPECTED"
                print(f"[{record.surface}] {record.outcome:8s} {record.input} :: {record.message[:110]}{flag}", flush=True)
        finally:
            _SANDBOX.clear()
    command = command_line("python scripts/reliability_probe.py", argv if argv is not None else sys.argv[1:])
    doc = {"schema": SCHEMA, "command": command, "machine": machine_info("cpu"), "outcomes": list(OUTCOMES),
           **summarise(records), "cases": [r.as_dict() for r in records]}  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out, doc)
    print(f"{doc['as_expected']} of {doc['total']} answered as expected; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
