"""``asap compile``: turn a trained Sinkhorn model into an ASAP model without retraining (docs/method.md sec. 4).

Typical use::

    from asap.compile import compile_model, save_compiled, load_compiled

    compiled, report = compile_model(teacher, calibration_batches, num_slices=16, refine="kl")
    save_compiled("runs/imdb_asap", compiled, report=report)
    model, manifest = load_compiled("runs/imdb_asap")

Modules: :mod:`~asap.compile.calibrate` (hooks, accumulation),
:mod:`~asap.compile.fit` (normal equations, ridge, KL refinement),
:mod:`~asap.compile.swap` (the pipeline), :mod:`~asap.compile.plans`
(attention matrices for analysis), :mod:`~asap.compile.report` (fidelity),
:mod:`~asap.compile.artifact` (save / strict load).
"""

from asap.compile.artifact import ArtifactError, load_compiled, read_manifest, save_compiled
from asap.compile.calibrate import LayerCalibration, collect, select_layers, sinkhorn_layers
from asap.compile.fit import NormalEquations, explained_variance, refine_kl, solve_ridge
from asap.compile.report import fidelity_table, plot_report
from asap.compile.swap import CompileOptions, compile_model, truncate_sinkhorn

__all__ = [
    "ArtifactError",
    "CompileOptions",
    "LayerCalibration",
    "NormalEquations",
    "collect",
    "compile_model",
    "explained_variance",
    "fidelity_table",
    "load_compiled",
    "plot_report",
    "read_manifest",
    "refine_kl",
    "save_compiled",
    "select_layers",
    "sinkhorn_layers",
    "solve_ridge",
    "truncate_sinkhorn",
]
