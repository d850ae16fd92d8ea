"""Benchmarks.

* :mod:`asap.bench.measure`: interleaved timing (median, IQR), peak memory (the machine description,
  :func:`machine_info`, is :mod:`asap.env`'s);
* :mod:`asap.bench.operators`: time and memory of every attention operator over a grid of shapes
  (``python -m asap.bench.operators``, ``asap bench operators``); its settings and command line are
  :mod:`asap.bench.operator_config`, its method table and fp64 verification :mod:`asap.bench.operator_methods`;
* :mod:`asap.bench.training_cost`: time and memory per training step, ESP vs Sinkhorn vs softmax;
* :mod:`asap.bench.accuracy`: the accuracy table, every method trained at one budget over seeds
  (``asap bench accuracy``);
* :mod:`asap.bench.frozen_layer`: one layer of a trained teacher compiled, accuracy and speed ratio
  (``asap bench frozen-layer``);
* :mod:`asap.bench.compile_experiments`: the frozen-layer, downstream-replacement and ablation experiments
  of the compile stage (``python -m asap.bench.compile_experiments``; also by its old name
  ``python -m asap.compile.experiments``);
* :mod:`asap.bench.compile_report`: the tables and figure of a compile report (``asap compile``, ``asap demo``);
* :mod:`asap.bench.compare` and :mod:`asap.bench.model_timing`: attention maps side by side and whole-model
  timings (``asap demo``);
* :mod:`asap.bench.report`: only the ``python -m`` name of the results report, which is its own stage above
  the benchmarks, :mod:`asap.report` (``asap report``).
"""

from asap.bench.measure import BenchmarkRun, MemoryReading, Timing, benchmark, peak_memory, speedups
from asap.env import machine_info

__all__ = ["BenchmarkRun", "MemoryReading", "Timing", "benchmark", "machine_info", "peak_memory", "speedups"]
