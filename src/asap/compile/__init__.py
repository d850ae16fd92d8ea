"""``asap compile``: turn a trained Sinkhorn model into an ASAP model without retraining (docs/method.md sec. 4).

Typical use::

    from asap.compile import compile_model, save_compiled, load_compiled

    compiled, report = compile_model(teacher, calibration_batches, num_slices=16, refine="kl")
    save_compiled("runs/imdb_asap", compiled, report=report)
    model, manifest = load_compiled("runs/imdb_asap")

Any model of your own (or a converted transformers encoder), in place, with your
own data and forward call, and its artifact without the project's model classes::

    from asap.compile import compile_module, save_compiled_module, load_compiled_module

    model, report = compile_module(model, loader, forward=lambda m, batch: m(batch["x"], batch["mask"]))
    save_compiled_module(model, "compiled/")
    model = load_compiled_module(MyModel(), "compiled/")

Modules: :mod:`~asap.compile.calibrate` (hooks, accumulation),
:mod:`~asap.compile.fit` (normal equations, ridge, KL refinement),
:mod:`~asap.compile.swap` (the pipeline), :mod:`~asap.compile.plans`
(attention matrices for analysis), :mod:`~asap.compile.report` (fidelity figures),
:mod:`~asap.compile.artifact` (save / strict load), :mod:`~asap.compile.module`
(any ``nn.Module``: compile in place, save, load), :mod:`~asap.compile.direct`
(a dual map fitted from raw ``(q, k, mask)`` tensors, no model). The report's tables and figure
(:mod:`asap.bench.compile_report`), side-by-side attention maps (:mod:`asap.bench.compare`), timings and
the experiment driver live in :mod:`asap.bench`: this stage computes, it does not time or draw.
"""

from asap.compile.artifact import ArtifactError, load_compiled, read_manifest, save_compiled
from asap.compile.calibrate import LayerCalibration, collect, select_layers, sinkhorn_layers
from asap.compile.direct import fit_dual_map
from asap.compile.fit import NormalEquations, explained_variance, refine_kl, solve_ridge
from asap.compile.module import compile_module, load_compiled_module, read_module_manifest, save_compiled_module
from asap.compile.swap import CompileOptions, compile_model, truncate_sinkhorn

__all__ = [
    "ArtifactError",
    "CompileOptions",
    "LayerCalibration",
    "NormalEquations",
    "collect",
    "compile_model",
    "compile_module",
    "explained_variance",
    "fit_dual_map",
    "load_compiled",
    "load_compiled_module",
    "read_manifest",
    "read_module_manifest",
    "refine_kl",
    "save_compiled",
    "save_compiled_module",
    "select_layers",
    "sinkhorn_layers",
    "solve_ridge",
    "truncate_sinkhorn",
]
