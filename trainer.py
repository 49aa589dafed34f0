"""Trainer: trains, evaluates and snapshots the ArcFace job on one process or many.

`train()` reads top to bottom: resume from the snapshot, evaluate the untrained model, then for
each epoch `_run_epoch` -> `_run_batch` steps, a summary line, evaluation every `eval_every`
epochs and a snapshot every `save_every` epochs. The same code runs without a process group
(single_gpu.py) and under DDP (the other launchers); only global rank 0 writes files.
"""

from __future__ import annotations

import json
import os
import pickle
import signal
import sys
import threading
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

import distributed
from arcface.evaluate import evaluate_loaders, prepare_eval_loader
from config import Config, dump_toml

SNAPSHOT_VERSION = 1
# Config fields that decide what a run is: a snapshot made with other values belongs to another run.
RUN_IDENTITY = ("arch", "pooling", "embedding_dim", "sub_centers", "data_root",
                "synthetic_items", "synthetic_views", "synthetic_size", "synthetic_seed")


class SnapshotMismatch(RuntimeError):
    """A snapshot written by another model, class count or data set than this run's."""


class Trainer:
    def __init__(
        self,
        cfg: Config,
        model: nn.Module,
        train_data: DataLoader,
        optimizer: torch.optim.Optimizer,
        lr_schedule: np.ndarray,
        query_set: Dataset,
        gallery_set: Dataset,
    ) -> None:
        self.cfg = cfg
        self.local_rank = distributed.local_rank()
        self.global_rank = distributed.global_rank()
        self.world_size = distributed.world_size()
        self.is_main = self.global_rank == 0
        self.device = distributed.pick_device(cfg.device, self.local_rank)
        self.amp_dtype = autocast_dtype(cfg.amp, self.device)
        self.memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format

        if cfg.sync_bn and self.world_size > 1:
            if self.device.type == "cuda":
                # Keeps the same Parameter objects, so the optimizer built earlier still owns them.
                model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
            else:
                self._say("sync_bn: SyncBatchNorm needs CUDA; training with per-process BatchNorm")
        self.raw_model = model.to(self.device, memory_format=self.memory_format)
        self.ddp_model: DDP | None = None
        self.model: nn.Module = self.raw_model
        if self.world_size > 1:
            self.ddp_model = DDP(
                self.raw_model,
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
                gradient_as_bucket_view=True,  # gradients live in the all-reduce buckets: no copy
            )
            self.model = self.ddp_model
        if cfg.compile:
            self.model = torch.compile(self.model)

        self.train_data = train_data
        self.optimizer = optimizer
        self.lr_schedule = lr_schedule
        self.steps_per_epoch = len(lr_schedule) // cfg.total_epochs
        # Spawned loader workers (in mp.spawn's processes, on macOS) take seconds to start, so they
        # are kept between evaluations; forked ones (Linux, torchrun) restart for free and do not
        # sit idle through training (2 x num_workers processes per rank).
        keep_workers = torch.multiprocessing.get_start_method() != "fork"
        self.query_loader, self.gallery_loader = (
            prepare_eval_loader(data, cfg.eval_batch_size, self.device, cfg.num_workers,
                                persistent_workers=keep_workers, worker_init_fn=distributed.ignore_stop_signals)
            for data in (query_set, gallery_set)
        )
        # Loss scaling only matters for fp16; a disabled scaler passes everything through.
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)

        self.snapshot_path = cfg.snapshot_path
        self.metrics_path = Path(cfg.out_dir) / "metrics.jsonl"
        self.epochs_run = 0  # completed epochs
        self.step_in_epoch = 0  # optimizer steps done in epoch `epochs_run` (a mid-epoch stop)
        self.history: list[dict[str, Any]] = []  # every metrics.jsonl line, kept in the snapshot
        self.best: dict[str, Any] = {}
        self.stop_signal: int | None = None

        self._load_snapshot()
        if self.is_main:
            self._start_run_dir()

    # ------------------------------------------------------------------------------------
    # The loop

    def train(self) -> int:
        """Runs the job to `total_epochs`. Returns 0, or 128 + signal number after a graceful stop."""
        cfg = self.cfg
        previous_handlers = self._catch_stop_signals()
        try:
            if self.step_in_epoch == 0 and self._evaluation_missing(self.epochs_run):
                # Epoch 0: the untrained model, the baseline the run improves on. Later: an
                # evaluation a stop at the end of that epoch skipped, kept in the snapshot.
                self._evaluate(self.epochs_run)
                if self.epochs_run:
                    self._save_snapshot()
            for epoch in range(self.epochs_run, cfg.total_epochs):
                train_stats, stop = self._run_epoch(epoch)
                if self.step_in_epoch == self.steps_per_epoch:  # else a stop cut the epoch short
                    self.epochs_run, self.step_in_epoch = epoch + 1, 0
                    self._log({"epoch": self.epochs_run, **train_stats})
                last = self.epochs_run == cfg.total_epochs
                if stop and not last:
                    # Every rank agreed to stop after the same step. No evaluation: the grace
                    # period before a kill is short. A stop during the very last step just finishes.
                    self._save_snapshot()
                    self._wait_for_all()
                    where = (f"at epoch {self.epochs_run + 1} step {self.step_in_epoch}" if self.step_in_epoch
                             else f"after epoch {self.epochs_run}")
                    self._say(f"stopped by {signal.Signals(self.stop_signal).name} {where}; "
                              f"snapshot saved to {self.snapshot_path}")
                    return 128 + self.stop_signal
                if last or self.epochs_run % cfg.eval_every == 0:
                    self._evaluate(self.epochs_run)
                if last or self.epochs_run % cfg.save_every == 0:
                    self._save_snapshot()
            self._wait_for_all()
            if self.best:
                self._say(f"done: best recall@1 {self.best['recall@1']:.2f} at epoch {self.best['epoch']}; "
                          f"outputs in {cfg.out_dir}")
            return 0
        finally:
            self._restore_signals(previous_handlers)

    def _run_epoch(self, epoch: int) -> tuple[dict[str, float], bool]:
        """Trains to the end of the epoch, or to the step at which every rank agreed to stop."""
        cfg = self.cfg
        accum = cfg.grad_accum_steps
        self.train_data.sampler.set_epoch(epoch, start=self.step_in_epoch * accum * cfg.batch_size)
        self.raw_model.train()
        bar = tqdm(total=self.steps_per_epoch, initial=self.step_in_epoch, disable=not self.is_main,
                   desc=f"epoch {epoch + 1}/{cfg.total_epochs}", dynamic_ncols=True,
                   mininterval=0.5 if sys.stderr.isatty() else 30.0, leave=False)
        loss_sum, steps, images, start, stop = 0.0, 0, 0, time.perf_counter(), False
        micro_loss = torch.zeros((), device=self.device)
        for micro, (source, targets) in enumerate(self.train_data, start=1):
            source = source.to(self.device, non_blocking=True)
            if source.dim() == 4:
                source = source.contiguous(memory_format=self.memory_format)
            targets = targets.to(self.device, non_blocking=True)
            sync = micro % accum == 0  # all-reduce gradients only on the last micro-batch
            micro_loss += self._run_batch(source, targets, sync)
            if not sync:
                continue
            lr = self._optimizer_step(epoch * self.steps_per_epoch + self.step_in_epoch)
            self.step_in_epoch += 1
            loss, stop = self._agree_on_step(micro_loss / accum, epoch)
            micro_loss = torch.zeros((), device=self.device)
            loss_sum, steps, images = loss_sum + loss, steps + 1, images + accum * len(source) * self.world_size
            bar.update(1)
            if steps % cfg.log_every == 0:
                bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}",
                                img_s=f"{images / (time.perf_counter() - start):.0f}")
            if stop or self.step_in_epoch == self.steps_per_epoch:
                break
        bar.close()
        seconds = time.perf_counter() - start
        return {"loss": loss_sum / steps, "lr": lr, "images_per_s": images / seconds, "seconds": seconds}, stop

    def _run_batch(self, source: torch.Tensor, targets: torch.Tensor, sync: bool) -> torch.Tensor:
        no_sync = self.ddp_model.no_sync() if (self.ddp_model is not None and not sync) else nullcontext()
        with no_sync:
            with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32,
                                enabled=self.amp_dtype is not None):
                logits = self.model(source, targets)  # (N, classes) margin logits, float32
            loss = F.cross_entropy(logits, targets)
            self.scaler.scale(loss / self.cfg.grad_accum_steps).backward()
        return loss.detach()

    def _optimizer_step(self, step: int) -> float:
        """scale -> backward (done) -> unscale_ -> clip -> step -> update: clipping sees true gradients."""
        lr = float(self.lr_schedule[step])
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        if self.cfg.clip_grad_norm > 0:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.raw_model.parameters(), self.cfg.clip_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return lr

    def _agree_on_step(self, loss: torch.Tensor, epoch: int) -> tuple[float, bool]:
        """One small all-reduce per step: mean loss, any non-finite loss, any stop signal.

        Every rank must stop at the same step, or the ones still running wait forever in the next
        collective; the loss check also forces the step to finish before the next one is queued.
        """
        flags = torch.stack([
            torch.nan_to_num(loss.float(), nan=0.0, posinf=0.0, neginf=0.0),
            (~torch.isfinite(loss)).float(),
            torch.tensor(float(self.stop_signal is not None), device=self.device),
        ])
        if self.world_size > 1:
            dist.all_reduce(flags)
        loss_sum, bad, stop = flags.tolist()
        if bad:
            raise FloatingPointError(
                f"non-finite loss at epoch {epoch + 1} step {self.step_in_epoch}: training stopped; "
                f"the last good snapshot ({self.snapshot_path}) is kept. Lower the lr or enable clip_grad_norm."
            )
        if stop and self.stop_signal is None:
            self.stop_signal = signal.SIGTERM  # another rank was signalled: stop with it
        return loss_sum / self.world_size, bool(stop)

    # ------------------------------------------------------------------------------------
    # Evaluation and logging

    def _evaluate(self, epoch: int) -> None:
        cfg = self.cfg
        start = time.perf_counter()
        self._share_rank0_buffers()
        metrics = evaluate_loaders(
            self.raw_model.embed, self.query_loader, self.gallery_loader, device=self.device,
            recall_at=cfg.recall_at, map_at=cfg.map_at, ap_mode=cfg.ap_mode,
            autocast_dtype=self.amp_dtype, channels_last=cfg.channels_last, progress=self.is_main,
        )
        record = {"epoch": epoch, **{k: v for k, v in metrics.items() if "@" in k},
                  "seconds": time.perf_counter() - start}
        if not self.best or record["recall@1"] > self.best["recall@1"]:
            self.best = {"epoch": epoch, "recall@1": record["recall@1"]}
        self._log(record)

    def _evaluation_missing(self, epoch: int) -> bool:
        due = epoch % self.cfg.eval_every == 0 or epoch == self.cfg.total_epochs
        return due and not any(r["epoch"] == epoch and "recall@1" in r for r in self.history)

    def _share_rank0_buffers(self) -> None:
        """BatchNorm statistics of rank 0 on every rank: the ones the snapshot keeps.

        DDP copies rank 0's buffers at the start of each training forward, so after the last step
        each rank holds statistics of its own batches; evaluated as they are, every rank would embed
        its share with another model. (Without SyncBatchNorm, that is; the copy is harmless with it.)
        """
        if self.world_size > 1:
            for buffer in self.raw_model.buffers():
                dist.broadcast(buffer, src=0)

    def _log(self, record: dict[str, Any]) -> None:
        """One summary line on the console and one JSON line in metrics.jsonl (rank 0)."""
        self.history.append(record)
        if not self.is_main:
            return
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")  # one write per line: no partial line on a crash
        print(format_record(record, self.cfg.total_epochs), flush=True)

    def _wait_for_all(self) -> None:
        """Every rank leaves only after rank 0's snapshot is on disk, so a launcher that ends the
        job when its first task exits (srun --kill-on-bad-exit) cannot interrupt the write."""
        if self.world_size > 1:
            dist.barrier()

    def _say(self, text: str) -> None:
        if self.is_main:
            print(text, flush=True)

    def _start_run_dir(self) -> None:
        """config.toml of this run, and metrics.jsonl made to agree with the snapshot it resumes."""
        out = Path(self.cfg.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "config.toml", dump_toml(self.cfg))
        # Lines logged after the snapshot was taken belong to work that is about to be redone.
        atomic_write_text(self.metrics_path, "".join(json.dumps(r) + "\n" for r in self.history))

    # ------------------------------------------------------------------------------------
    # Snapshots

    def _save_snapshot(self) -> None:
        if not self.is_main:
            return
        snapshot = {
            "format_version": SNAPSHOT_VERSION,
            "model": self.raw_model.state_dict(),  # the unwrapped module: no `module.` prefixes
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "epochs_run": self.epochs_run,
            "step_in_epoch": self.step_in_epoch,
            "steps_per_epoch": self.steps_per_epoch,
            "num_classes": self._num_classes(),
            "config": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self.cfg).items()},
            "history": self.history,
            "best": self.best,
            "rng": {"torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
        }
        atomic_torch_save(snapshot, self.snapshot_path)
        where = f"epoch {self.epochs_run}" + (f" step {self.step_in_epoch}" if self.step_in_epoch else "")
        print(f"snapshot saved at {where} to {self.snapshot_path}", flush=True)

    def _load_snapshot(self) -> None:
        snapshot = self._fetch_snapshot()
        if snapshot is None:
            return
        self._check_snapshot(snapshot)
        # Tensors arrive on the CPU and are copied into the model's device by load_state_dict,
        # which avoids holding a second copy of the weights on the accelerator.
        self.raw_model.load_state_dict(snapshot["model"], strict=True)
        self.optimizer.load_state_dict(snapshot["optimizer"])
        self.scaler.load_state_dict(snapshot["scaler"])
        self.epochs_run = snapshot["epochs_run"]
        self.step_in_epoch = snapshot["step_in_epoch"]
        self.history = list(snapshot["history"])
        self.best = dict(snapshot["best"])
        torch.set_rng_state(snapshot["rng"]["torch"])
        if snapshot["rng"]["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(snapshot["rng"]["cuda"])
        where = f"epoch {self.epochs_run}" + (f" step {self.step_in_epoch}" if self.step_in_epoch else "")
        self._say(f"resuming from snapshot {self.snapshot_path} at {where}")

    def _fetch_snapshot(self) -> dict[str, Any] | None:
        """The newest snapshot any process can see, on every process.

        Nodes need not share a file system: each process reports the position of the snapshot on
        its own disk, and the owner of the newest one sends it to the rest over the process group.
        """
        if self.world_size == 1:
            return load_snapshot(self.snapshot_path) if self.snapshot_path.exists() else None
        # A reading error travels as its message in place of the result, so that every rank stops
        # with it instead of waiting in the collective for the rank that failed.
        mine = _or_reason(snapshot_position, self.snapshot_path) if self.local_rank == 0 else None
        positions: list[Any] = [None] * self.world_size
        dist.all_gather_object(positions, mine)
        _raise_any_reason(positions)
        seen = [(p, rank) for rank, p in enumerate(positions) if p is not None]
        if not seen:
            return None
        newest, source = max(seen, key=lambda item: (tuple(item[0]), -item[1]))
        box = [_or_reason(load_snapshot, self.snapshot_path) if self.global_rank == source else None]
        dist.broadcast_object_list(box, src=source, device=self.device if self.device.type == "cuda" else None)
        _raise_any_reason(box)
        return box[0]

    def _check_snapshot(self, snapshot: dict[str, Any]) -> None:
        path = self.snapshot_path
        if snapshot.get("format_version") != SNAPSHOT_VERSION:
            raise SnapshotMismatch(f"{path}: snapshot format {snapshot.get('format_version')!r}, "
                                   f"expected {SNAPSHOT_VERSION}")
        saved = snapshot["config"]
        current = asdict(self.cfg)
        keys = [k for k in RUN_IDENTITY if k in saved and saved[k] != current[k]]
        if snapshot["num_classes"] != self._num_classes():
            keys.append("num_classes")
        if keys:
            diffs = ", ".join(f"{k}: snapshot {saved.get(k, snapshot['num_classes'])!r} vs now "
                              f"{current.get(k, self._num_classes())!r}" for k in keys)
            raise SnapshotMismatch(f"{path} belongs to another run ({diffs}). Use another --out_dir "
                                   f"(or --snapshot), or delete the snapshot to start afresh.")
        if snapshot["epochs_run"] > self.cfg.total_epochs:
            raise SnapshotMismatch(
                f"{path} has run {snapshot['epochs_run']} epochs, more than total_epochs "
                f"{self.cfg.total_epochs}. Give total_epochs >= {snapshot['epochs_run']} to continue it, or "
                f"another --out_dir (or --snapshot) for a new run."
            )
        if snapshot["step_in_epoch"] >= snapshot["steps_per_epoch"]:
            raise SnapshotMismatch(f"{path}: step {snapshot['step_in_epoch']} is not inside an epoch of "
                                   f"{snapshot['steps_per_epoch']} steps; the snapshot is damaged")
        if snapshot["step_in_epoch"] and snapshot["steps_per_epoch"] != self.steps_per_epoch:
            raise SnapshotMismatch(
                f"{path} stopped in the middle of an epoch of {snapshot['steps_per_epoch']} steps, but "
                f"this run has {self.steps_per_epoch} steps per epoch (another batch size or world size). "
                f"Resume with the settings it was started with."
            )

    def _num_classes(self) -> int:
        return self.raw_model.head.weight.shape[0] // self.raw_model.head.sub_centers

    # ------------------------------------------------------------------------------------
    # Signals: preemption (Slurm sends SIGUSR1 or SIGTERM before the time limit) stops cleanly.

    def _catch_stop_signals(self) -> dict[int, Any]:
        if sys.platform == "win32" or not _in_main_thread():
            return {}
        previous = {}
        for sig in distributed.STOP_SIGNALS:
            previous[sig] = signal.signal(sig, self._on_stop_signal)
        return previous

    def _on_stop_signal(self, signum: int, frame: Any) -> None:
        if self.stop_signal is None:
            self.stop_signal = signum
            print(f"[rank {self.global_rank}] {signal.Signals(signum).name} received: "
                  f"stopping after the current step", file=sys.stderr, flush=True)

    @staticmethod
    def _restore_signals(previous: dict[int, Any]) -> None:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


# ----------------------------------------------------------------------------------------
# Helpers


def autocast_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """bf16 on CUDA when supported ("auto"), as requested otherwise; None means full precision."""
    if amp == "off":
        return None
    if amp == "fp16":
        return torch.float16
    if amp == "bf16":
        return torch.bfloat16
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None


def format_record(record: dict[str, Any], total_epochs: int) -> str:
    if "loss" in record:
        return (f"epoch {record['epoch']}/{total_epochs} | loss {record['loss']:.4f} | lr {record['lr']:.3e} | "
                f"{record['images_per_s']:.0f} img/s | {record['seconds']:.1f} s")
    metrics = " | ".join(f"{k} {v:.2f}" for k, v in record.items() if "@" in k)
    return f"eval  {record['epoch']}/{total_epochs} | {metrics} | {record['seconds']:.1f} s"


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_torch_save(obj: Any, path: Path) -> None:
    """torch.save to a temporary file, then os.replace: a crash never leaves a half-written snapshot."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


SNAPSHOT_KEYS = ("format_version", "model", "optimizer", "scaler", "epochs_run", "step_in_epoch",
                 "steps_per_epoch", "num_classes", "config", "history", "best", "rng")


def load_snapshot(path: Path) -> dict[str, Any]:
    """weights_only: a snapshot from elsewhere can hold tensors and plain data, never code."""
    try:
        snapshot = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file: say which one
        raise SnapshotMismatch(f"{path}: cannot be read as a snapshot ({_first_line(e)})") from e
    if not isinstance(snapshot, dict) or "format_version" not in snapshot:
        raise SnapshotMismatch(f"{path}: not a snapshot of this project (no 'format_version' key)")
    missing = [key for key in SNAPSHOT_KEYS if key not in snapshot]
    if missing:
        raise SnapshotMismatch(f"{path}: not a complete snapshot (missing {', '.join(missing)})")
    return snapshot


def _first_line(error: Exception) -> str:
    """Why torch.load failed, in one line. Its advice to retry with weights_only=False is left out:
    a snapshot never needs code to load, so a file that does is not one."""
    if isinstance(error, pickle.UnpicklingError):
        return "not a torch file of tensors and plain data"
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}; truncated, or not written by torch.save"


def snapshot_position(path: Path) -> tuple[int, int] | None:
    """(epochs, step) of the snapshot at `path`, read through mmap so the weights stay on disk."""
    if not path.exists():
        return None
    try:
        snapshot = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        return int(snapshot["epochs_run"]), int(snapshot["step_in_epoch"])
    except Exception as e:
        raise SnapshotMismatch(f"{path}: cannot be read as a snapshot ({_first_line(e)})") from e


def _or_reason(read: Callable[[Path], Any], path: Path) -> Any:
    """read(path), or the message of the SnapshotMismatch it raised."""
    try:
        return read(path)
    except SnapshotMismatch as unusable:
        return str(unusable)


def _raise_any_reason(results: list[Any]) -> None:
    reasons = [r for r in results if isinstance(r, str)]
    if reasons:
        raise SnapshotMismatch(reasons[0])


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()
