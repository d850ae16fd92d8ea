"""The training loop over objects: a model, datasets, an optimiser, a schedule (:class:`Trainer`).

:func:`asap.train.train` builds those objects from a :class:`~asap.train.config.TrainConfig`
and hands them to a :class:`Trainer`; your own model and data go through the same loop,
checkpoints and resume::

    options = LoopOptions(out_dir="runs/mine", epochs=3, batch_size=32)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    with Trainer(model, train_set, val_set, optimizer=optimizer, scheduler=scheduler, options=options) as trainer:
        summary = trainer.run()
    # later, the same objects built the same way, and Trainer(..., resume=True).run() continues the run exactly

The state of a run between two optimiser steps is (model, optimiser, schedule, RNG
of every process, epoch, batch within the epoch, global step, running epoch sums);
:meth:`Trainer.save` writes exactly that (``checkpoint.safetensors``, no pickle), so
a run stopped at any step boundary (``checkpoint_every``, ``stop_after_steps``,
Ctrl-C, SIGTERM) and resumed ends with the weights of an uninterrupted run.

Safety rules the loop keeps:

* one process per run folder, and nothing written before every check has passed
  (:class:`~asap.train.run_folder.RunFolder`);
* a non-finite loss is caught at *every* step without a host sync: each step
  folds ``isfinite(loss)`` into a device flag, read at each progress refresh and
  before every checkpoint or metrics line, so no NaN weights or bare ``NaN``
  are ever written and the last good checkpoint stays as it was;
* a resumed run must have the settings it was started with (``config.json``).
"""

from __future__ import annotations

import dataclasses
import math
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset, default_collate
from tqdm.auto import tqdm

from asap.env import machine_info
from asap.errors import AsapError, ConfigError
from asap.io import append_command, append_json_line, atomic_write_bytes, atomic_write_json, dumps_strict
from asap.train.layout import CONFIG_FILE, FORMAT_VERSION, METRICS_FILE, CheckpointError
from asap.train.resume_state import capture_rng_state, load_checkpoint, restore_rng_state, save_checkpoint
from asap.train.run_config import (
    RunConfig,
    library_versions,
    model_config_dict,
    read_json_file,
    read_run_config,
    save_model,
    write_run_config,
)
from asap.train.config import RUNTIME_FIELDS, OptionError, _bool, _int, _real, _str
from asap.train.data import EpochBatchSampler, batch_inputs, make_loader
from asap.train.distributed import (
    DistInfo,
    all_reduce_sum,
    barrier,
    cleanup_distributed,
    gather_stack,
    setup_distributed,
)
from asap.train.evaluate import evaluate
from asap.train.run_folder import RunFolder, read_metrics


class TrainingDiverged(AsapError):
    """The training loss became NaN or infinite; nothing non-finite was written."""


class RunInterrupted(KeyboardInterrupt):
    """A run stopped by SIGINT or SIGTERM after writing its checkpoint; ``signum`` says which."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


@dataclass(frozen=True)
class LoopOptions:
    """How :class:`Trainer` runs the loop (not what the model or optimiser are).

    ``batch_size`` is the *global* batch (each of N processes takes ``batch_size / N``);
    the order of epoch ``e`` is drawn from ``(seed, e)`` (:class:`~asap.train.data.EpochBatchSampler`),
    the last incomplete batch is dropped. Gradients are clipped to norm ``grad_clip`` (None: no clip).
    Progress is shown every ``log_every`` steps; a checkpoint is written every ``checkpoint_every``
    steps (0: at epoch ends and on interruption only); ``stop_after_steps`` stops, with a checkpoint,
    once the global step reaches it. ``eval_batch_size`` None is twice ``batch_size``.
    ``device`` ("auto", "cpu", "cuda[:i]") is used when the Trainer sets up the processes itself
    (no ``dist`` given; under ``torchrun`` it joins the process group).

    The fields of :data:`~asap.train.config.RUNTIME_FIELDS` may change when a run is resumed;
    the others (``epochs``, ``batch_size``, ``seed``, ``grad_clip``) must not.
    Every field is checked when the options are built (:class:`ConfigError` naming it).
    """

    out_dir: str
    epochs: int = 1
    batch_size: int = 32
    seed: int = 0
    grad_clip: float | None = 1.0
    log_every: int = 10
    checkpoint_every: int = 0
    stop_after_steps: int | None = None
    eval_batch_size: int | None = None
    num_workers: int = 0
    progress: bool = True
    compile: bool = False
    device: str = "auto"

    def __post_init__(self) -> None:
        object.__setattr__(self, "out_dir", str(self.out_dir) if hasattr(self.out_dir, "__fspath__") else self.out_dir)
        try:
            _str("out_dir", self.out_dir)
            _int("epochs", self.epochs, minimum=1)
            _int("batch_size", self.batch_size, minimum=1)
            _int("seed", self.seed, minimum=0, maximum=2**32 - 1)
            _real("grad_clip", self.grad_clip, low=0.0, low_open=True, optional=True)
            _int("log_every", self.log_every, minimum=1)
            _int("checkpoint_every", self.checkpoint_every, minimum=0)
            _int("stop_after_steps", self.stop_after_steps, minimum=1, optional=True)
            _int("eval_batch_size", self.eval_batch_size, minimum=1, optional=True)
            _int("num_workers", self.num_workers, minimum=0)
            _bool("progress", self.progress)
            _bool("compile", self.compile)
            _str("device", self.device)
        except OptionError as err:
            raise ConfigError(f"LoopOptions.{err.field}: {err.problem}") from None

    @property
    def resolved_eval_batch_size(self) -> int:
        return 2 * self.batch_size if self.eval_batch_size is None else self.eval_batch_size

    def steps_per_epoch(self, num_examples: int) -> int:
        """Optimiser steps in one epoch over ``num_examples`` training examples (the last incomplete batch dropped)."""
        return num_examples // self.batch_size

    def total_steps(self, num_examples: int) -> int:
        """Optimiser steps of the whole run: what a schedule stepped once per step spans."""
        return self.epochs * self.steps_per_epoch(num_examples)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_config(cls, config: Any) -> LoopOptions:
        """The loop options of a :class:`~asap.train.config.TrainConfig` (its fields of the same names)."""
        return cls(**{f.name: getattr(config, f.name) for f in dataclasses.fields(cls)})


@contextmanager
def stop_requests() -> Iterator[list[Any]]:
    """Turn SIGINT/SIGTERM into a request to stop at the next step boundary (a consistent checkpoint).

    Yields a list whose first item becomes True on a request. A second
    Ctrl-C interrupts at once. Signal handlers can only be set from the main
    thread; elsewhere this yields a flag that never changes.
    A second element records the signal number of the first request.
    """
    flag: list[Any] = [False, None]
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def request(signum, frame):
        if flag[0] and signum == signal.SIGINT:
            raise KeyboardInterrupt
        flag[0] = True
        flag[1] = flag[1] or signum

    previous = {sig: signal.signal(sig, request) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield flag
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _jsonable(value: Any) -> Any:
    """``value`` as plain JSON (tuples as lists; what JSON cannot hold as its repr), for the run record."""
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if value is None or isinstance(value, (bool, int, str)) or (isinstance(value, float) and math.isfinite(value)):
        return value
    return repr(value)


class Trainer:
    """One training run of a classifier: ``Trainer(model, train_data, val_data, optimizer=..., options=...).run()``.

    The model protocol (what :mod:`asap.models` models and the transformers adapter
    :class:`~asap.integrations.hf.classifier.HFClassifier` follow):

    * ``model.input_names``: the names of its keyword inputs, taken from each collated batch;
    * ``model(**inputs)`` returns logits ``(batch, num_classes)``; the loss is the
      cross-entropy with ``batch["labels"]`` (class indices);
    * ``model.config``: a description of the architecture, a JSON-serialisable dict or an
      object with ``to_dict()``; it is written to ``config.json`` and to the header of every
      weights file, and a resumed run must have the same.

    Data: ``train_data`` and ``val_data`` are map-style datasets; ``collate`` turns a list of
    their items into the batch dict (default :func:`torch.utils.data.default_collate`, which
    stacks dict items). Datasets with ``set_epoch(e)`` get it before each epoch (augmentation).

    Optimiser and schedule are *objects* built by the caller on the model's parameters;
    ``scheduler`` (None: none) is stepped once per optimiser step, so
    :meth:`LoopOptions.total_steps` is the length a schedule spans. Objects, not factories:
    exact resume never rebuilds them, it restores their complete state (AdamW moments, param
    groups, the schedule's step) in place from the checkpoint, so the caller only has to build
    them as at the start. The model is moved to the device in place (the optimiser keeps its
    parameters). The optimiser's class and defaults are recorded, and must match on resume.

    Run folder (``options.out_dir``): ``config.json`` (the model config, the loop options, the
    optimiser; or ``run_config``, the :class:`~asap.train.run_config.RunConfig` that
    :func:`asap.train.train` writes), ``checkpoint.safetensors``, ``model.safetensors``,
    ``metrics.jsonl``, ``command.txt`` (``command``). ``resume=True`` continues the run found there.

    Processes: ``dist`` None sets them up from the environment (``torchrun``, else one process on
    ``options.device``) and tears them down in :meth:`close`. Use the Trainer as a context
    manager, or call :meth:`close`, to release the run folder.

    Raises (from the constructor, nothing written): :class:`ConfigError`, :class:`CheckpointError`;
    from :meth:`run`: :class:`TrainingDiverged` (the last good checkpoint kept),
    :class:`RunInterrupted` (SIGINT/SIGTERM, after a checkpoint).
    """

    def __init__(
        self,
        model: nn.Module,
        train_data: Dataset,
        val_data: Dataset,
        *,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
        options: LoopOptions,
        collate: Callable[[list[Any]], dict[str, torch.Tensor]] = default_collate,
        resume: bool = False,
        dist: DistInfo | None = None,
        run_folder: RunFolder | None = None,
        run_config: RunConfig | None = None,
        command: str | None = None,
    ):
        self.options, self.train_data, self.val_data, self.collate = options, train_data, val_data, collate
        self.model, self.optimizer, self.scheduler, self.run_config = model, optimizer, scheduler, run_config
        self._owns_dist = dist is None
        self.dist = setup_distributed(options.device) if dist is None else dist
        self.folder: RunFolder | None = None
        try:
            self._check_inputs()
            self.folder = run_folder or RunFolder(options.out_dir, resume=resume, dist=self.dist)
            self.run_dir, self.checkpoint_path = self.folder.path, self.folder.checkpoint_path
            if run_folder is None:
                with self.folder.setting_up():
                    self._set_up(resume=resume, command=command)
            else:  # the caller's set-up (train(config)) undoes the folder if this fails
                self._set_up(resume=resume, command=command)
        except BaseException:
            if self._owns_dist:
                cleanup_distributed(self.dist)
            raise

    def __enter__(self) -> Trainer:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        """Release the run folder (its lock), and the process group if this Trainer set it up."""
        if self.folder is not None:
            self.folder.release()
        if self._owns_dist:
            cleanup_distributed(self.dist)
            self._owns_dist = False

    # ------------------------------------------------------------------ set-up

    def _check_inputs(self) -> None:
        o, world = self.options, self.dist.world_size
        if o.batch_size % world != 0:
            raise ConfigError(f"--batch-size {o.batch_size} must be divisible by the number of processes {world}")
        if len(self.train_data) < o.batch_size:
            raise ConfigError(
                f"--batch-size {o.batch_size} is larger than the {len(self.train_data)} training example(s); "
                "not one step per epoch"
            )
        if len(self.val_data) == 0:
            raise ConfigError("the validation set is empty")
        for name in ("input_names", "config"):
            if not hasattr(self.model, name):
                raise ConfigError(f"the model has no .{name} (see the model protocol in Trainer's docstring)")

    def _set_up(self, *, resume: bool, command: str | None) -> None:
        dist, o = self.dist, self.options
        self.model = self.model.to(dist.device)  # in place: the optimiser keeps its parameters
        self.steps_per_epoch = o.steps_per_epoch(len(self.train_data))
        self.total_steps = o.total_steps(len(self.train_data))
        self.epoch = self.batch_in_epoch = self.global_step = 0
        self.epoch_seconds = self.previous_seconds = 0.0
        self.sums = torch.zeros(3, dtype=torch.float64, device=dist.device)  # loss sum, correct, count
        # The first step whose loss was not finite (-1: none yet), kept on the device: no sync per step.
        self.first_bad_step = torch.full((), -1, dtype=torch.int64, device=dist.device)
        self.last_saved_step: int | None = None
        fresh_start = self.folder.fresh_start
        if resume and not fresh_start:
            self._restore()
            self.last_saved_step = self.global_step
        else:
            if resume:  # same settings as the run's own config.json, and the same model
                self._check_same_settings()
            # Each process its own dropout stream, all determined by the seed.
            torch.manual_seed(int(np.random.SeedSequence([o.seed, dist.rank]).generate_state(1)[0]))
        stop = o.stop_after_steps
        self.device_step = torch.full((), self.global_step, dtype=torch.int64, device=dist.device)
        if stop is not None and stop <= self.global_step:
            raise ConfigError(f"--stop-after-steps {stop}: the run is already at step {self.global_step}")
        if dist.is_main:
            if command is not None:  # keep the command lines that built this run (only once accepted)
                append_command(self.run_dir, command)
            if not resume or fresh_start:
                self.folder.config_written = True
                self._write_run_record()
                atomic_write_bytes(self.run_dir / METRICS_FILE, b"")

        self.forward_model: nn.Module = self.model
        if dist.distributed:
            device_ids = [dist.device.index] if dist.device.type == "cuda" else None
            self.forward_model = nn.parallel.DistributedDataParallel(self.model, device_ids=device_ids)
        if o.compile:
            self.forward_model = torch.compile(self.forward_model)
        self.start_time = time.perf_counter()

    def run_record(self, *, environment: bool = True) -> dict[str, Any]:
        """``config.json`` of a run given objects (without ``run_config``): what a resumed run must match.

        ``environment`` (where it runs: informative only, never compared) can be left out.
        """
        record = {
            "format_version": FORMAT_VERSION,
            "versions": library_versions(),
            "model": model_config_dict(self.model),
            "loop": self.options.to_dict(),
            "optimizer": {"type": type(self.optimizer).__name__, "defaults": _jsonable(self.optimizer.defaults)},
            "scheduler": None if self.scheduler is None else type(self.scheduler).__name__,
        }
        if environment:
            record["environment"] = {**machine_info(self.dist.device), "world_size": self.dist.world_size}
        return record

    def _write_run_record(self) -> None:
        if self.run_config is not None:
            write_run_config(self.run_dir, self.run_config)
        else:
            atomic_write_json(self.run_dir / CONFIG_FILE, self.run_record())

    def _check_same_settings(self) -> None:
        path = self.run_dir / CONFIG_FILE
        if self.run_config is not None:
            stored = read_run_config(self.run_dir)
            changed = stored.train.differences(self.run_config.train)
            same_model = stored.model.to_dict() == self.run_config.model.to_dict()
        else:
            stored_dict, now = read_json_file(path, what="run config"), self.run_record(environment=False)
            if not isinstance(stored_dict, dict) or not isinstance(stored_dict.get("loop"), dict):
                raise CheckpointError(f"{path}: not the config of a run trained by a Trainer given objects")
            old, new = stored_dict["loop"], now["loop"]
            changed = {k: (old.get(k), new[k]) for k in new if k not in RUNTIME_FIELDS and old.get(k) != new[k]}
            for key in ("optimizer", "scheduler"):
                if stored_dict.get(key) != now[key]:
                    changed[key] = (stored_dict.get(key), now[key])
            same_model = stored_dict.get("model") == now["model"]
        if changed:
            raise CheckpointError(
                f"{path}: the run was trained with other settings, cannot resume with "
                + ", ".join(f"{k}={new!r} (run: {old!r})" for k, (old, new) in changed.items())
            )
        if not same_model:
            raise CheckpointError(f"{path}: the stored model config differs from the rebuilt one")

    def _restore(self) -> None:
        self._check_same_settings()
        state = load_checkpoint(self.checkpoint_path, model=self.model, optimizer=self.optimizer, scheduler=self.scheduler)
        saved_world = state.progress["world_size"]
        if saved_world != self.dist.world_size:
            raise CheckpointError(
                f"{self.checkpoint_path}: written by {saved_world} process(es); resume with the same number "
                f"(got {self.dist.world_size}) to continue the same random streams"
            )
        p = state.progress
        self.epoch, self.batch_in_epoch, self.global_step = p["epoch"], p["batch_in_epoch"], p["global_step"]
        self.epoch_seconds, self.previous_seconds = p["epoch_seconds"], p["elapsed_seconds"]
        self.sums = state.progress_tensors["sums"][self.dist.rank].to(self.dist.device)
        restore_rng_state({k: v[self.dist.rank] for k, v in state.rng.items()}, self.dist.device)
        if self.dist.is_main:  # drop metric lines of epochs the checkpoint does not include
            lines = read_metrics(self.run_dir / METRICS_FILE)
            kept = "".join(dumps_strict(r) + "\n" for r in lines if r["epoch"] <= self.epoch)
            atomic_write_bytes(self.run_dir / METRICS_FILE, kept.encode())

    # ------------------------------------------------------------------ the loop

    def run(self) -> dict[str, Any]:
        """Train to the end (or to ``stop_after_steps``); the summary (on every rank).

        ``{"run_dir", "completed", "global_step", "epochs_done", "history" (the lines of
        metrics.jsonl, rank 0), "test": None, "elapsed_seconds"}``; evaluate a test set
        afterwards with :meth:`evaluate`.
        """
        with stop_requests() as signalled:
            while self.epoch < self.options.epochs:
                finished_epoch = self._train_epoch(signalled)
                if not finished_epoch:
                    self.save()
                    if self._agreed(signalled[0]):
                        message = f"interrupted at step {self.global_step}; resume with --resume {self.run_dir}"
                        self._say(message)
                        raise RunInterrupted(message, signalled[1] or signal.SIGINT)
                    return self._done(completed=False)
                self._end_epoch()
        return self._done(completed=True)

    def _done(self, *, completed: bool) -> dict[str, Any]:
        summary = self.summary(completed=completed)
        # Wait for rank 0 to finish writing: a rank that tears down its gloo group while a peer is still
        # in flight aborts ("terminate called without an active exception"). Not on the error path.
        barrier(self.dist)
        return summary

    def _train_epoch(self, signalled: list[Any]) -> bool:
        """Run the rest of the current epoch; False if stopped early (by request or ``stop_after_steps``)."""
        o, d = self.options, self.dist
        sampler = EpochBatchSampler(
            len(self.train_data), batch_size=o.batch_size, seed=o.seed, epoch=self.epoch,
            rank=d.rank, world_size=d.world_size, start_batch=self.batch_in_epoch,
        )  # fmt: skip
        loader = make_loader(
            self.train_data, sampler, collate=self.collate, num_workers=o.num_workers, seed=o.seed + self.epoch
        )
        bar = tqdm(
            total=self.steps_per_epoch, initial=self.batch_in_epoch, desc=f"epoch {self.epoch + 1}/{o.epochs}",
            disable=not (d.is_main and o.progress), dynamic_ncols=True, leave=False,
        )  # fmt: skip
        if hasattr(self.train_data, "set_epoch"):  # fresh, reproducible augmentation draws each epoch
            self.train_data.set_epoch(self.epoch)
        self.model.train()
        start = time.perf_counter()
        try:
            for batch in loader:
                self._step(batch)
                bar.update(1)
                if self.global_step % o.log_every == 0:
                    self._log_progress(bar)
                if o.checkpoint_every and self.global_step % o.checkpoint_every == 0:
                    self.save()
                stop_now = o.stop_after_steps is not None and self.global_step >= o.stop_after_steps
                if stop_now or self._agreed(signalled[0]):
                    return False
            return True
        finally:
            self.epoch_seconds += time.perf_counter() - start
            bar.close()

    def _step(self, batch: dict[str, torch.Tensor]) -> None:
        labels = batch["labels"].to(self.dist.device, non_blocking=True)
        logits = self.forward_model(**batch_inputs(batch, self.model.input_names, self.dist.device))
        loss = F.cross_entropy(logits.float(), labels)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        finite = torch.isfinite(loss.detach())
        if self.options.grad_clip is not None:
            norm = nn.utils.clip_grad_norm_(self.model.parameters(), self.options.grad_clip)
            finite &= torch.isfinite(norm)  # an infinite gradient would be scaled to NaN weights
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        with torch.no_grad():
            correct = (logits.argmax(-1) == labels).sum()
            self.sums += torch.stack([loss.detach().double() * len(labels), correct.double(), self.sums.new_tensor(len(labels))])
            # Device-side bookkeeping, read only at log/checkpoint/epoch boundaries (no sync here).
            self.device_step += 1
            self.first_bad_step = torch.where(~finite & (self.first_bad_step < 0), self.device_step, self.first_bad_step)
        self.batch_in_epoch += 1
        self.global_step += 1

    def _lr(self) -> float:
        """The learning rate now (of the first parameter group)."""
        if self.scheduler is not None:
            return self.scheduler.get_last_lr()[0]
        return float(self.optimizer.param_groups[0]["lr"])

    def _log_progress(self, bar: tqdm) -> None:
        """Show this process's running loss/accuracy; a non-finite loss stops the run with a clear error."""
        self._check_finite()
        loss_sum, correct, count = self.sums.tolist()  # the one host sync, every log_every steps
        figures = {"loss": f"{loss_sum / count:.4f}", "acc": f"{correct / count:.3f}", "lr": f"{self._lr():.2e}"}
        bar.set_postfix(**figures)
        if not self.options.progress and self.dist.is_main:  # no bar (a log file): one plain line instead
            print(f"epoch {self.epoch + 1}/{self.options.epochs} step {self.batch_in_epoch}/{self.steps_per_epoch} "
                  + " ".join(f"{k} {v}" for k, v in figures.items()), file=sys.stderr, flush=True)  # fmt: skip

    def _check_finite(self, *, weights: bool = False) -> None:
        """Raise :class:`TrainingDiverged` if any process saw a non-finite loss (or, with ``weights``, holds
        non-finite weights). Called before anything is written, so no NaN reaches a file."""
        local = self.first_bad_step.reshape(1).to(torch.float64)
        if weights:
            bad_weights = ~torch.stack([torch.isfinite(p).all() for p in self.model.parameters()]).all()
            local = torch.cat([local, bad_weights.reshape(1).to(torch.float64)])
        else:
            local = torch.cat([local, local.new_zeros(1)])
        if self.dist.distributed:  # every rank must take the same branch
            flags = torch.stack([(local[0] >= 0).double(), local[1]])
            flags = all_reduce_sum(flags, self.dist)
            bad_loss, bad_weights_any = (flags > 0).tolist()
        else:
            bad_loss, bad_weights_any = bool(local[0] >= 0), bool(local[1] > 0)
        if not (bad_loss or bad_weights_any):
            return
        step = int(local[0]) if local[0] >= 0 else None
        what = (
            f"the training loss became NaN or infinite at step {step}" if step is not None
            else "the training loss became NaN or infinite" if bad_loss
            else f"the weights became NaN or infinite by step {self.global_step}"
        )  # fmt: skip
        kept = (
            f"the last checkpoint (step {self.last_saved_step}) in {self.run_dir} is intact"
            if self.last_saved_step is not None else "no checkpoint was written"
        )  # fmt: skip
        lr = self.optimizer.defaults.get("lr")
        lr_text = f"{lr:g}" if isinstance(lr, (int, float)) else f"{lr}"
        raise TrainingDiverged(
            f"{what} (epoch {self.epoch + 1}); stopped without saving it, {kept}; "
            f"try a lower --lr (now {lr_text}) or --grad-clip (now {self.options.grad_clip})"
        )

    def _agreed(self, local_flag: bool) -> bool:
        """True if any process was asked to stop (every process must stop at the same step)."""
        if not self.dist.distributed:
            return local_flag
        return bool(all_reduce_sum(torch.tensor([float(local_flag)], device=self.dist.device), self.dist).item())

    def _end_epoch(self) -> None:
        self._check_finite()
        loss_sum, correct, count = all_reduce_sum(self.sums, self.dist).tolist()
        val = self.evaluate(self.val_data)
        record = {
            "epoch": self.epoch + 1,
            "step": self.global_step,
            "lr": self._lr(),
            "train_loss": loss_sum / count,
            "train_acc": correct / count,
            "val_loss": val["loss"],
            "val_acc": val["accuracy"],
            "samples_per_sec": count / self.epoch_seconds,
            "epoch_seconds": self.epoch_seconds,
            "elapsed_seconds": self.elapsed(),
        }
        if self.dist.is_main:
            append_json_line(self.run_dir / METRICS_FILE, record)
            self._say(
                f"epoch {record['epoch']}/{self.options.epochs}: train loss {record['train_loss']:.4f} "
                f"acc {record['train_acc']:.4f} | val loss {record['val_loss']:.4f} acc {record['val_acc']:.4f} "
                f"| {record['samples_per_sec']:.0f} samples/s"
            )
        self.epoch += 1
        self.batch_in_epoch = 0
        self.epoch_seconds = 0.0
        self.sums.zero_()
        self.save()

    def evaluate(self, dataset: Dataset, collate: Callable | None = None) -> dict[str, float]:
        """``{"loss", "accuracy", "num_samples"}`` of the model on ``dataset`` (a collective call)."""
        o = self.options
        return evaluate(
            self.model, dataset, collate=collate or self.collate, batch_size=o.resolved_eval_batch_size,
            device=self.dist.device, dist=self.dist, num_workers=o.num_workers,
        )  # fmt: skip

    def summary(self, *, completed: bool) -> dict[str, Any]:
        history = read_metrics(self.run_dir / METRICS_FILE) if self.dist.is_main else []
        return {
            "run_dir": str(self.run_dir),
            "completed": completed,
            "global_step": self.global_step,
            "epochs_done": self.epoch,
            "history": history,
            "test": None,
            "elapsed_seconds": self.elapsed(),
        }

    # ------------------------------------------------------------------ checkpoints

    def save(self) -> None:
        """Write the resumable checkpoint and the current weights (rank 0); a collective call.

        Refused (:class:`TrainingDiverged`) if a loss since the start, or a weight now, is not finite:
        the previous checkpoint then stays as it was.
        """
        self._check_finite(weights=True)
        rng = {k: gather_stack(v, self.dist) for k, v in capture_rng_state(self.dist.device).items()}
        sums = gather_stack(self.sums, self.dist)
        if not self.dist.is_main:
            self.last_saved_step = self.global_step
            return
        progress = {
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "global_step": self.global_step,
            "epoch_seconds": self.epoch_seconds,
            "elapsed_seconds": self.elapsed(),
            "world_size": self.dist.world_size,
        }
        save_checkpoint(
            self.checkpoint_path, model=self.model, optimizer=self.optimizer, scheduler=self.scheduler,
            rng=rng, progress=progress, progress_tensors={"sums": sums},
        )  # fmt: skip
        save_model(self.run_dir, self.model, step=self.global_step)
        self.last_saved_step = self.global_step

    def elapsed(self) -> float:
        """Seconds of training so far, over every session of the run."""
        return self.previous_seconds + time.perf_counter() - self.start_time

    def _say(self, message: str) -> None:
        if self.dist.is_main:
            print(message, flush=True)
