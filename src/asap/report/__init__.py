"""Regenerate ``results/README.md`` and its plots from the committed result JSON.

Nothing in the report is typed by hand: every measured number is read from a
JSON file under ``results/``, and the README states the machine and the
command that produced each file. Run ``python -m asap.bench.report`` (or
``asap report``) after adding or updating any result.

The generator is a list of :class:`Section` s (:data:`asap.report.driver.SECTIONS`).
Each one names the JSON files it reads (glob patterns under ``results/``) and a
renderer from the loaded files to Markdown lines (plus any plots it draws), one
module per result schema:

* :mod:`asap.report.core`: :class:`Doc`, :class:`Section`, :class:`Rendered`, loading
  a section's files, the number formats, the Markdown table, the machine line and
  the command that produced a result;
* :mod:`asap.report.operators`, :mod:`~asap.report.training_cost`, :mod:`~asap.report.compile`,
  :mod:`~asap.report.accuracy`, :mod:`~asap.report.frozen_layer`, :mod:`~asap.report.fidelity`,
  :mod:`~asap.report.asap_paths`, :mod:`~asap.report.triton_gpu`, :mod:`~asap.report.teachers`,
  :mod:`~asap.report.reliability`: one section each;
* :mod:`asap.report.generic`: any file whose schema has no dedicated section, flattened
  into a key/value table; adding a dedicated renderer for a new schema is one module
  and one :class:`Section`;
* :mod:`asap.report.paper`: the "against the paper" section, which quotes the paper's
  claims (:data:`~asap.report.paper.PAPER_CLAIMS`, with their source) next to the
  matching figures measured here, where we have them, and says "not measured yet"
  where we do not;
* :mod:`asap.report.driver`: the sections in order, :func:`generate_report` and the
  command line.

A section whose files are absent prints a visible note saying which command produces them.
"""

from asap.report.core import Doc, Rendered, Section
from asap.report.driver import SECTIONS, add_arguments, generate_report, main, run_from_args

__all__ = ["SECTIONS", "Doc", "Rendered", "Section", "add_arguments", "generate_report", "main", "run_from_args"]
