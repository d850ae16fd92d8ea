"""The training loop: ``train(config) -> metrics``.

One :class:`Trainer` per run. Its state between two optimiser steps is
(model, AdamW, schedule, RNG of every process, epoch, batch within the epoch,
global step, running epoch sums); :meth:`Trainer.save` writes exactly that, so
a run stopped at any step boundary (``checkpoint_every``, ``stop_after_steps``,
Ctrl-C, SIGTERM) and resumed ends with the weights of an uninterrupted run.

Safety rules the loop keeps:

* one process per run folder (:class:`~asap.train.lock.RunLock`);
* nothing is written before every check has passed (options, run folder,
  data sizes, model); a set-up that fails removes what it created;
* a non-finite loss is caught at *every* step without a host sync: each step
  folds ``isfinite(loss)`` into a device flag, read at each progress refresh and
  before every checkpoint or metrics line, so no NaN weights or bare ``NaN``
  are ever written and the last good checkpoint stays as it was;
* a run stopped before its first checkpoint (``config.json`` but no
  ``checkpoint.safetensors``) resumes from step 0.
"""

from __future__ import annotations

import json
import math
import shutil
import signal
import threading
import time
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from asap.env import machine_info
from asap.errors import AsapError, ConfigError
from asap.io import append_command, append_json_line, atomic_write_bytes, atomic_write_json, dumps_strict
from asap.models import ModelConfig, TextClassifierConfig, ViTConfig
from asap.train.checkpoint import (
    CHECKPOINT_FILE,
    CONFIG_FILE,
    METRICS_FILE,
    TOKENIZER_FILE,
    CheckpointError,
    RunConfig,
    capture_rng_state,
    load_checkpoint,
    read_run_config,
    restore_rng_state,
    save_checkpoint,
    save_model,
    write_run_config,
)
from asap.train.config import TrainConfig
from asap.train.lock import RunLock
from asap.train.pretrained import initial_model, pretrained_model_config
from asap.train.data import EpochBatchSampler, batch_inputs, load_split, make_loader, prepare_data
from asap.train.distributed import (
    DistInfo,
    all_reduce_sum,
    barrier,
    cleanup_distributed,
    gather_stack,
    setup_distributed,
)
from asap.train.evaluate import eval_record, evaluate
from asap.train.schedule import warmup_cosine


class TrainingDiverged(AsapError):
    """The training loss became NaN or infinite; nothing non-finite was written."""


class RunInterrupted(KeyboardInterrupt):
    """A run stopped by SIGINT or SIGTERM after writing its checkpoint; ``signum`` says which."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


def train(
    config: TrainConfig, *, resume: bool = False, command: str | None = None, allow_unfitted: bool = False
) -> dict[str, Any]:
    """Train a model as ``config`` says; with ``resume=True`` continue the run in ``config.out_dir``.

    Under ``torchrun`` every process calls this; the global batch is split
    across them and only rank 0 writes files. Returns (on every rank) a dict
    with the per-epoch ``history`` (as in ``metrics.jsonl``), ``test`` metrics
    (None when the run stopped early), ``global_step`` and ``completed``.

    ``command`` (the command line) is appended to ``RUN_DIR/command.txt`` once
    every check has passed. ``method="asap"`` trains with a dual map that is never
    fitted (``asap compile`` fits it to a trained teacher); that is refused
    unless ``allow_unfitted``.

    Raises:
        ConfigError, CheckpointError: bad options or run folder (nothing written).
        TrainingDiverged: a non-finite loss (the last good checkpoint is kept).
        RunInterrupted: SIGINT/SIGTERM, after a checkpoint.
    """
    if config.method == "asap" and not allow_unfitted:
        raise ConfigError(
            "--method asap: ASAP's dual map is not trained but fitted to a trained teacher by `asap compile`; "
            "train with sinkhorn and compile, or pass --allow-unfitted (allow_unfitted=True) to train with an "
            "unfitted (zero) map"
        )
    dist = setup_distributed(config.device)
    try:
        trainer = Trainer(config, dist, resume=resume, command=command)
        try:
            result = trainer.run()
            # Wait for rank 0 to finish writing: a rank that tears down its gloo group
            # while a peer is still in flight aborts ("terminate called without an
            # active exception"). Not on the error path, where a peer may never arrive.
            barrier(dist)
        finally:
            trainer.close()
        return result
    finally:
        cleanup_distributed(dist)


def model_config_for(config: TrainConfig, data_info: dict[str, Any]) -> ModelConfig:
    """The model a training config asks for, shaped by the data (vocabulary, classes, image size).

    A pretrained model (``config.pretrained``) gives its own config, checked against the data
    (:func:`asap.train.pretrained.pretrained_model_config`).
    Raises :class:`ConfigError` when the options do not fit the data (a patch
    size that does not divide the image).
    """
    if config.pretrained is not None:
        return pretrained_model_config(config, data_info)
    size = config.model_size()
    common = dict(num_classes=len(data_info["classes"]), dropout=config.dropout, attention=config.attention_config(), **size)
    if data_info["kind"] == "text":
        return TextClassifierConfig(
            vocab_size=data_info["vocab_size"], max_length=config.max_length, pooling=config.pooling, **common
        )
    image_size = data_info["image_size"]
    patch_size = config.patch_size
    if patch_size is None:  # the default: the largest of 4, 2, 1 that leaves at least 4 x 4 patches
        patch_size = next(p for p in (4, 2, 1) if image_size % p == 0 and image_size // p >= 4)
    elif patch_size > image_size or image_size % patch_size != 0:
        raise ConfigError(
            f"--patch-size {patch_size} does not divide the {image_size} x {image_size} images of {data_info['dataset']}"
        )
    return ViTConfig(image_size=image_size, patch_size=patch_size, in_channels=data_info["in_channels"], **common)


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on weight matrices only (not biases, norms, position embeddings, class token)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        skip = param.dim() < 2 or name.split(".")[-1] in ("position_embedding", "cls_token")
        (no_decay if skip else decay).append(param)
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=config.lr, betas=config.betas)


@contextmanager
def stop_requests():
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


class Trainer:
    """One training run (see the module docstring). Use :func:`train`."""

    def __init__(self, config: TrainConfig, dist: DistInfo, *, resume: bool = False, command: str | None = None):
        self.config, self.dist = config, dist
        self.run_dir = Path(config.out_dir)
        self.checkpoint_path = self.run_dir / CHECKPOINT_FILE
        if config.batch_size % dist.world_size != 0:
            raise ConfigError(
                f"--batch-size {config.batch_size} must be divisible by the number of processes {dist.world_size}"
            )
        self.fresh_start = self._check_run_dir(resume)  # before anything is created: a refusal writes nothing
        barrier(dist)  # every process has checked before rank 0 writes anything
        self.lock: RunLock | None = None
        created = self._make_run_dir() if dist.is_main else None
        tokenizer_existed = (self.run_dir / TOKENIZER_FILE).exists()
        try:
            if dist.is_main:
                self.lock = RunLock(self.run_dir)
                self._check_run_dir(resume)  # again, now that no other process can change the folder
            self._set_up(config, dist, resume=resume, command=command)
        except BaseException:
            if dist.is_main:
                self._undo_set_up(created, tokenizer_existed)
            raise

    def _make_run_dir(self) -> Path | None:
        """Create the run folder; return the outermost folder this created (None if it existed)."""
        top = None
        for folder in (self.run_dir, *self.run_dir.parents):
            if folder.exists():
                break
            top = folder
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise CheckpointError(f"{self.run_dir}: cannot create the run directory ({err.strerror or err})") from None
        return top

    def _undo_set_up(self, created: Path | None, tokenizer_existed: bool) -> None:
        """A set-up that failed before the run was written leaves the folder as it found it."""
        if self._config_written_now:  # the run exists now (and can be resumed): keep it
            self.close()
            return
        if created is not None:
            shutil.rmtree(created, ignore_errors=True)
        elif not tokenizer_existed:
            (self.run_dir / TOKENIZER_FILE).unlink(missing_ok=True)
        if self.lock is not None:
            self.lock.release(remove=created is None)

    #: True once this process has written the run's config.json (the run then exists).
    _config_written_now = False

    def close(self) -> None:
        """Release the run folder (its lock)."""
        if self.lock is not None:
            self.lock.release()

    def _set_up(self, config: TrainConfig, dist: DistInfo, *, resume: bool, command: str | None) -> None:
        if resume and self.fresh_start:
            self._say(f"{self.run_dir} holds no checkpoint yet (the run stopped before its first one): starting at step 0")
        seed_all(config.seed)

        self.data = prepare_data(config, self.run_dir, dist)
        model_config = model_config_for(config, self.data.info)
        torch.manual_seed(config.seed)  # identical initial weights on every process
        self.model = initial_model(config, model_config).to(dist.device)
        self.run_config = RunConfig(
            model=model_config, train=config, data=self.data.info,
            environment={**machine_info(dist.device), "world_size": dist.world_size},
        )  # fmt: skip

        self.steps_per_epoch = len(self.data.train) // config.batch_size  # >= 1: prepare_data checked
        self.total_steps = config.epochs * self.steps_per_epoch
        self.optimizer = make_optimizer(self.model, config)
        schedule = partial(
            warmup_cosine,
            warmup_steps=math.ceil(config.warmup_fraction * self.total_steps),
            total_steps=self.total_steps,
            min_ratio=config.min_lr_ratio,
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, schedule)

        self.epoch = self.batch_in_epoch = self.global_step = 0
        self.epoch_seconds = self.previous_seconds = 0.0
        self.sums = torch.zeros(3, dtype=torch.float64, device=dist.device)  # loss sum, correct, count
        # The first step whose loss was not finite (-1: none yet), kept on the device: no sync per step.
        self.first_bad_step = torch.full((), -1, dtype=torch.int64, device=dist.device)
        self.last_saved_step: int | None = None
        if resume and not self.fresh_start:
            self._restore()
            self.last_saved_step = self.global_step
        else:
            if resume:  # same settings as the run's own config.json, and the same model
                self._check_same_settings(read_run_config(self.run_dir))
            # Each process its own dropout stream, all determined by the seed.
            torch.manual_seed(int(np.random.SeedSequence([config.seed, dist.rank]).generate_state(1)[0]))
        stop = config.stop_after_steps
        self.device_step = torch.full((), self.global_step, dtype=torch.int64, device=dist.device)
        if stop is not None and stop <= self.global_step:
            raise ConfigError(f"--stop-after-steps {stop}: the run is already at step {self.global_step}")
        if dist.is_main:
            if command is not None:  # keep the command lines that built this run (only once accepted)
                append_command(self.run_dir, command)
            if not resume or self.fresh_start:
                self._config_written_now = True
                write_run_config(self.run_dir, self.run_config)
                atomic_write_bytes(self.run_dir / METRICS_FILE, b"")

        self.forward_model: nn.Module = self.model
        if dist.distributed:
            device_ids = [dist.device.index] if dist.device.type == "cuda" else None
            self.forward_model = nn.parallel.DistributedDataParallel(self.model, device_ids=device_ids)
        if config.compile:
            self.forward_model = torch.compile(self.forward_model)
        self.start_time = time.perf_counter()

    # ------------------------------------------------------------------ set-up helpers

    def _check_run_dir(self, resume: bool) -> bool:
        """Refuse a folder that cannot be used; True when the run starts at step 0 (no checkpoint yet)."""
        has_config = (self.run_dir / CONFIG_FILE).exists()
        has_checkpoint = self.checkpoint_path.exists()
        if resume:
            if not self.run_dir.is_dir():
                raise CheckpointError(f"{self.run_dir}: no such run directory; nothing to resume")
            if not has_config:
                raise CheckpointError(
                    f"{self.run_dir / CONFIG_FILE}: file not found; {self.run_dir} holds no run to resume "
                    "(start a new one with --out)"
                )
            return not has_checkpoint
        if self.run_dir.exists() and not self.run_dir.is_dir():
            raise CheckpointError(f"{self.run_dir}: exists and is not a directory; choose another output directory")
        if has_checkpoint:
            raise CheckpointError(
                f"{self.run_dir} already holds a run; continue it with --resume {self.run_dir}, "
                "or choose another output directory"
            )
        if has_config:
            raise CheckpointError(
                f"{self.run_dir} holds a run that stopped before its first checkpoint; start it again from step 0 "
                f"with --resume {self.run_dir}, or delete the folder, or choose another output directory"
            )
        return True

    def _check_same_settings(self, stored: RunConfig) -> None:
        changed = stored.train.differences(self.config)
        if changed:
            raise CheckpointError(
                f"{self.run_dir / CONFIG_FILE}: the run was trained with other settings, cannot resume with "
                + ", ".join(f"{k}={new!r} (run: {old!r})" for k, (old, new) in changed.items())
            )
        if stored.model.to_dict() != self.run_config.model.to_dict():
            raise CheckpointError(f"{self.run_dir / CONFIG_FILE}: the stored model config differs from the rebuilt one")

    def _restore(self) -> None:
        self._check_same_settings(read_run_config(self.run_dir))
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
        with stop_requests() as signalled:
            while self.epoch < self.config.epochs:
                finished_epoch = self._train_epoch(signalled)
                if not finished_epoch:
                    self.save()
                    if self._agreed(signalled[0]):
                        message = f"interrupted at step {self.global_step}; resume with --resume {self.run_dir}"
                        self._say(message)
                        raise RunInterrupted(message, signalled[1] or signal.SIGINT)
                    return self._summary(test=None)
                self._end_epoch()
        return self._finish()

    def _train_epoch(self, signalled: list[Any]) -> bool:
        """Run the rest of the current epoch; False if stopped early (by request or ``stop_after_steps``)."""
        c, d = self.config, self.dist
        sampler = EpochBatchSampler(
            len(self.data.train), batch_size=c.batch_size, seed=c.seed, epoch=self.epoch,
            rank=d.rank, world_size=d.world_size, start_batch=self.batch_in_epoch,
        )  # fmt: skip
        loader = make_loader(
            self.data.train, sampler, collate=self.data.collate, num_workers=c.num_workers, seed=c.seed + self.epoch
        )
        bar = tqdm(
            total=self.steps_per_epoch, initial=self.batch_in_epoch, desc=f"epoch {self.epoch + 1}/{c.epochs}",
            disable=not (d.is_main and c.progress), dynamic_ncols=True, leave=False,
        )  # fmt: skip
        if hasattr(self.data.train, "set_epoch"):  # fresh, reproducible augmentation draws each epoch
            self.data.train.set_epoch(self.epoch)
        self.model.train()
        start = time.perf_counter()
        try:
            for batch in loader:
                self._step(batch)
                bar.update(1)
                if self.global_step % c.log_every == 0:
                    self._log_progress(bar)
                if c.checkpoint_every and self.global_step % c.checkpoint_every == 0:
                    self.save()
                stop_now = c.stop_after_steps is not None and self.global_step >= c.stop_after_steps
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
        if self.config.grad_clip is not None:
            norm = nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
            finite &= torch.isfinite(norm)  # an infinite gradient would be scaled to NaN weights
        self.optimizer.step()
        self.scheduler.step()
        with torch.no_grad():
            correct = (logits.argmax(-1) == labels).sum()
            self.sums += torch.stack([loss.detach().double() * len(labels), correct.double(), self.sums.new_tensor(len(labels))])
            # Device-side bookkeeping, read only at log/checkpoint/epoch boundaries (no sync here).
            self.device_step += 1
            self.first_bad_step = torch.where(~finite & (self.first_bad_step < 0), self.device_step, self.first_bad_step)
        self.batch_in_epoch += 1
        self.global_step += 1

    def _log_progress(self, bar: tqdm) -> None:
        """Show this process's running loss/accuracy; a non-finite loss stops the run with a clear error."""
        self._check_finite()
        loss_sum, correct, count = self.sums.tolist()  # the one host sync, every log_every steps
        bar.set_postfix(loss=f"{loss_sum / count:.4f}", acc=f"{correct / count:.3f}", lr=f"{self.scheduler.get_last_lr()[0]:.2e}")

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
        raise TrainingDiverged(
            f"{what} (epoch {self.epoch + 1}); stopped without saving it, {kept}; "
            f"try a lower --lr (now {self.config.lr:g}) or --grad-clip (now {self.config.grad_clip})"
        )

    def _agreed(self, local_flag: bool) -> bool:
        """True if any process was asked to stop (every process must stop at the same step)."""
        if not self.dist.distributed:
            return local_flag
        return bool(all_reduce_sum(torch.tensor([float(local_flag)], device=self.dist.device), self.dist).item())

    def _end_epoch(self) -> None:
        self._check_finite()
        loss_sum, correct, count = all_reduce_sum(self.sums, self.dist).tolist()
        val = self._evaluate(self.data.val, self.data.collate)
        record = {
            "epoch": self.epoch + 1,
            "step": self.global_step,
            "lr": self.scheduler.get_last_lr()[0],
            "train_loss": loss_sum / count,
            "train_acc": correct / count,
            "val_loss": val["loss"],
            "val_acc": val["accuracy"],
            "samples_per_sec": count / self.epoch_seconds,
            "epoch_seconds": self.epoch_seconds,
            "elapsed_seconds": self._elapsed(),
        }
        if self.dist.is_main:
            append_json_line(self.run_dir / METRICS_FILE, record)
            self._say(
                f"epoch {record['epoch']}/{self.config.epochs}: train loss {record['train_loss']:.4f} "
                f"acc {record['train_acc']:.4f} | val loss {record['val_loss']:.4f} acc {record['val_acc']:.4f} "
                f"| {record['samples_per_sec']:.0f} samples/s"
            )
        self.epoch += 1
        self.batch_in_epoch = 0
        self.epoch_seconds = 0.0
        self.sums.zero_()
        self.save()

    def _evaluate(self, dataset, collate) -> dict[str, float]:
        c = self.config
        return evaluate(
            self.model, dataset, collate=collate, batch_size=c.resolved_eval_batch_size,
            device=self.dist.device, dist=self.dist, num_workers=c.num_workers,
        )  # fmt: skip

    def _finish(self) -> dict[str, Any]:
        start = time.perf_counter()
        c = self.config
        test_set, collate = load_split(self.data.info, self.run_dir, split="test", data_dir=c.data_dir, limit=c.limit)
        test = eval_record(
            self._evaluate(test_set, collate), run_dir=self.run_dir, dataset=self.config.dataset, split="test",
            limit=self.config.limit, attention=self.run_config.model.attention.to_dict(),
            seconds=time.perf_counter() - start, device=self.dist.device,
        )  # fmt: skip
        if self.dist.is_main:
            atomic_write_json(self.run_dir / "eval_test.json", test)
            self._say(f"test accuracy {test['accuracy']:.4f} (loss {test['loss']:.4f}, {test['num_samples']} examples)")
        return self._summary(test=test)

    def _summary(self, *, test: dict[str, Any] | None) -> dict[str, Any]:
        history = read_metrics(self.run_dir / METRICS_FILE) if self.dist.is_main else []
        return {
            "run_dir": str(self.run_dir),
            "completed": test is not None,
            "global_step": self.global_step,
            "epochs_done": self.epoch,
            "history": history,
            "test": test,
            "elapsed_seconds": self._elapsed(),
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
            "elapsed_seconds": self._elapsed(),
            "world_size": self.dist.world_size,
        }
        save_checkpoint(
            self.checkpoint_path, model=self.model, optimizer=self.optimizer, scheduler=self.scheduler,
            rng=rng, progress=progress, progress_tensors={"sums": sums},
        )  # fmt: skip
        save_model(self.run_dir, self.model, step=self.global_step)
        self.last_saved_step = self.global_step

    def _elapsed(self) -> float:
        return self.previous_seconds + time.perf_counter() - self.start_time

    def _say(self, message: str) -> None:
        if self.dist.is_main:
            print(message, flush=True)


def seed_all(seed: int) -> None:
    """Seed Python, numpy and torch (all devices)."""
    import random

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl`` file (empty if it does not exist)."""
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
