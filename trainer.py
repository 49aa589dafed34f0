"""Trainer: trains, evaluates and snapshots the ArcFace job on one process or many.

`train()` reads top to bottom: resume from the snapshot, evaluate the untrained model, then for
each epoch `_run_epoch` -> `_run_batch` steps, a summary line, evaluation every `eval_every`
epochs and a snapshot every `save_every` epochs. The same code runs without a process group
(single_gpu.py) and under DDP (the other launchers); only global rank 0 writes files.
"""

from __future__ import annotations

import signal
import sys
import time
from contextlib import nullcontext
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from arcface.partial_fc import (  # the same for a dense and a sharded head
    clip_grad_norm_,
    ddp_ignore_shards,
)
from arcface.retrieval import NonFiniteEmbeddings, evaluate_loaders, prepare_eval_loader
from support import runtime
from support.config import Config, dump_toml
from support.errors import UserError
from support.rundir import RunDir, claim_run_dir, format_record
from support.schedule import Schedule
from support.snapshot import (
    Progress,
    capture,
    check_resume,
    fetch_newest_snapshot,
    position_text,
    restore,
    write_snapshot,
)


class Diverged(UserError, FloatingPointError):
    """The loss, the weights or the BatchNorm statistics became NaN or infinite."""


class Trainer:
    def __init__(
        self,
        cfg: Config,
        model: nn.Module,
        train_data: DataLoader,
        optimizer: torch.optim.Optimizer,
        schedule: Schedule,
        query_set: Dataset,
        gallery_set: Dataset,
        device: torch.device,
    ) -> None:
        self.cfg = cfg
        self.device = device  # decided by the launcher
        self.global_rank = runtime.global_rank()
        self.world_size = runtime.world_size()
        self.is_main = self.global_rank == 0
        self.schedule = schedule
        self._check_schedule(train_data)
        self.amp_dtype = runtime.autocast_dtype(cfg.amp, device)
        self.memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
        self.raw_model, self.ddp_model, self.model = self._wrap_model(model)
        self.train_data = train_data
        self.optimizer = optimizer
        self.query_loader, self.gallery_loader = self._eval_loaders(query_set, gallery_set)
        # Loss scaling only matters for fp16; a disabled scaler passes everything through.
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.amp_dtype == torch.float16)

        self.snapshot_path = cfg.snapshot_path
        self.run_dir = RunDir(cfg.out_dir, self.snapshot_path, tensorboard=cfg.tensorboard)
        self.epochs_run = 0  # completed epochs
        self.step_in_epoch = 0  # optimizer steps done in epoch `epochs_run` (a mid-epoch stop)
        self.saved_at: tuple[int, int] | None = None  # position of the newest snapshot on disk
        self.history: list[dict[str, Any]] = []  # every metrics.jsonl line, kept in the snapshot
        self.best: dict[str, Any] = {}
        self.stop = runtime.StopSignals(self.global_rank)  # preemption: stop after the current step

        claim_run_dir(self.run_dir, self.device)
        try:
            changes = self._load_snapshot()
            if self.is_main:
                self._start_run_dir(changes)
        except BaseException:
            self.run_dir.release()
            raise

    def _check_schedule(self, train_data: DataLoader) -> None:
        """The loader and the process group must be the ones the schedule was computed for."""
        loader_batch = getattr(train_data, "batch_size", self.schedule.batch_size)
        if (loader_batch, self.world_size) != (self.schedule.batch_size, self.schedule.world_size):
            raise ValueError(f"the schedule is for batch_size {self.schedule.batch_size} x "
                             f"{self.schedule.world_size} processes, but the loader has batch_size "
                             f"{loader_batch} and the job {self.world_size} processes")
        if self.schedule.total_epochs != self.cfg.total_epochs:
            raise ValueError(f"the schedule covers {self.schedule.total_epochs} epochs, the config "
                             f"{self.cfg.total_epochs}")

    def _wrap_model(self, model: nn.Module) -> tuple[nn.Module, DDP | None, nn.Module]:
        """(the module itself, its DDP wrapper or None, what the training step calls)."""
        if self.cfg.sync_bn and self.world_size > 1:
            if self.device.type == "cuda":
                # Keeps the same Parameter objects, so the optimizer built earlier still owns them.
                model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
            else:
                self._say("sync_bn: SyncBatchNorm needs CUDA; training with per-process BatchNorm")
        raw_model = model.to(self.device, memory_format=self.memory_format)
        ddp_model = None
        ddp_ignore_shards(raw_model)  # each rank's shard of a sharded head is its own: no all-reduce
        if self.world_size > 1:
            ddp_model = DDP(
                raw_model,
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
                gradient_as_bucket_view=True,  # gradients live in the all-reduce buckets: no copy
            )
        step_model = ddp_model or raw_model
        return raw_model, ddp_model, torch.compile(step_model) if self.cfg.compile else step_model

    def _eval_loaders(self, query_set: Dataset, gallery_set: Dataset) -> tuple[DataLoader, DataLoader]:
        # Spawned loader workers (in mp.spawn's processes, on macOS) take seconds to start, so they
        # are kept between evaluations; forked ones (Linux, torchrun) restart for free and do not
        # sit idle through training (2 x num_workers processes per rank).
        keep_workers = torch.multiprocessing.get_start_method() != "fork"
        query_loader, gallery_loader = (
            prepare_eval_loader(data, self.cfg.eval_batch_size, self.device, self.cfg.num_workers,
                                persistent_workers=keep_workers,
                                worker_init_fn=runtime.stop_signal_safe_workers())
            for data in (query_set, gallery_set)
        )
        return query_loader, gallery_loader

    # ------------------------------------------------------------------------------------
    # The loop

    def train(self) -> int:
        """Runs the job to `total_epochs`. Returns 0, or 128 + signal number after a graceful stop."""
        cfg = self.cfg
        self.stop.catch()
        try:
            if self.step_in_epoch == 0 and self._evaluation_missing(self.epochs_run):
                # Epoch 0: the untrained model, the baseline the run improves on. Later: an
                # evaluation a stop at the end of that epoch skipped, kept in the snapshot.
                self._evaluate(self.epochs_run)
                if self.epochs_run:
                    self._save_snapshot()
            for epoch in range(self.epochs_run, cfg.total_epochs):
                train_stats, stop = self._run_epoch(epoch)
                if self.step_in_epoch == self.schedule.steps_per_epoch:  # else a stop cut the epoch short
                    self.epochs_run, self.step_in_epoch = epoch + 1, 0
                    self._log({"epoch": self.epochs_run, **train_stats})
                last = self.epochs_run == cfg.total_epochs
                if stop and not last:
                    # Every rank agreed to stop after the same step. No evaluation: the grace
                    # period before a kill is short. A stop during the very last step just finishes.
                    self._save_snapshot()
                    self._wait_for_all()
                    self._say(f"stopped by {signal.Signals(self.stop.signal).name} "
                              f"{position_text(self.epochs_run, self.step_in_epoch)}; "
                              f"snapshot saved to {self.snapshot_path}")
                    return 128 + self.stop.signal
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
            self.stop.restore()
            self.run_dir.release()

    def _run_epoch(self, epoch: int) -> tuple[dict[str, float], bool]:
        """Trains to the end of the epoch, or to the step at which every rank agreed to stop."""
        cfg = self.cfg
        accum = self.schedule.grad_accum_steps
        self.train_data.sampler.set_epoch(epoch, start_step=self.step_in_epoch)
        self.raw_model.train()
        bar = tqdm(total=self.schedule.steps_per_epoch, initial=self.step_in_epoch, disable=not self.is_main,
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
            step = epoch * self.schedule.steps_per_epoch + self.step_in_epoch  # in the whole run
            micro_loss += self._run_batch(source, targets, step, sync)
            if not sync:
                continue
            lr = self._optimizer_step(step)
            self.step_in_epoch += 1
            loss, stop = self._agree_on_step(micro_loss / accum)
            micro_loss = torch.zeros((), device=self.device)
            loss_sum, steps, images = loss_sum + loss, steps + 1, images + self.schedule.global_batch
            bar.update(1)
            if steps % cfg.log_every == 0:
                bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}",
                                img_s=f"{images / (time.perf_counter() - start):.0f}")
            if stop or self.step_in_epoch == self.schedule.steps_per_epoch:
                break
        bar.close()
        seconds = time.perf_counter() - start
        return {"loss": loss_sum / steps, "lr": lr, "images_per_s": images / seconds, "seconds": seconds}, stop

    def _run_batch(self, source: torch.Tensor, targets: torch.Tensor, step: int, sync: bool) -> torch.Tensor:
        no_sync = self.ddp_model.no_sync() if (self.ddp_model is not None and not sync) else nullcontext()
        with no_sync:
            with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32,
                                enabled=self.amp_dtype is not None):
                # float32; a head that samples classes draws them per optimizer step: exact on resume
                loss = self.model(source, targets, step)
            self.scaler.scale(loss / self.schedule.grad_accum_steps).backward()
        return loss.detach()

    def _optimizer_step(self, step: int) -> float:
        """scale -> backward (done) -> unscale_ -> clip -> step -> update: clipping sees true gradients."""
        lr = float(self.schedule.lr[step])
        for group in self.optimizer.param_groups:
            # A group's multiple of the schedule (job.make_optimizer): layer decay, the head's
            # multiple. Snapshots from before groups had one hold no lr_scale: 1.
            group["lr"] = lr * group.get("lr_scale", 1.0)
        if self.cfg.clip_grad_norm > 0:
            self.scaler.unscale_(self.optimizer)
            clip_grad_norm_(self.raw_model, self.cfg.clip_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return lr

    def _agree_on_step(self, loss: torch.Tensor) -> tuple[float, bool]:
        """One small all-reduce per step: mean loss, any non-finite loss, any stop signal.

        Every rank must stop at the same step, or the ones still running wait forever in the next
        collective; the loss check also forces the step to finish before the next one is queued.
        """
        flags = torch.stack([
            torch.nan_to_num(loss.float(), nan=0.0, posinf=0.0, neginf=0.0),
            (~torch.isfinite(loss)).float(),
            # BatchNorm statistics do not enter the training loss: they can diverge while it stays
            # finite, and only evaluation would notice. They are small: a cheap check per step.
            (~torch.isfinite(self._buffer_maxima()).all()).float(),
            torch.tensor(float(self.stop.signal is not None), device=self.device),
        ])
        if self.world_size > 1:
            dist.all_reduce(flags)
        loss_sum, bad_loss, bad_buffers, stop = flags.tolist()
        if bad_loss or bad_buffers:
            self._diverged("loss" if bad_loss else f"BatchNorm statistics ({self._first_non_finite() or 'on another rank'})")
        if stop and self.stop.signal is None:
            self.stop.signal = signal.SIGTERM  # another rank was signalled: stop with it
        return loss_sum / self.world_size, bool(stop)

    def _buffer_maxima(self) -> torch.Tensor:
        """max |x| of every floating-point buffer: finite exactly when the buffer is (NaN propagates)."""
        maxima = [b.detach().abs().amax() for b in self.raw_model.buffers() if b.is_floating_point() and b.numel()]
        return torch.stack(maxima).float() if maxima else torch.zeros(1, device=self.device)

    def _first_non_finite(self) -> str | None:
        """The name of the first parameter or buffer holding a NaN or an infinity."""
        tensors = [*self.raw_model.named_parameters(), *self.raw_model.named_buffers()]
        return next((name for name, t in tensors if t.is_floating_point() and not torch.isfinite(t).all()), None)

    def _check_weights_finite(self) -> None:
        """Every rank agrees that the weights are finite before they are saved (a collective)."""
        name = self._first_non_finite()
        bad = torch.tensor(float(name is not None), device=self.device)
        if self.world_size > 1:
            dist.all_reduce(bad)
        if bad.item():
            self._diverged(f"weights ({name or 'on another rank'})")

    def _diverged(self, what: str) -> None:
        kept = (f"the last good snapshot ({position_text(*self.saved_at)}) is kept at {self.snapshot_path}"
                if self.saved_at else "no snapshot had been saved yet")
        raise Diverged(f"non-finite {what} {position_text(self.epochs_run, self.step_in_epoch)}: training "
                       f"stopped and nothing was saved; {kept}. Lower the lr or enable clip_grad_norm.")

    # ------------------------------------------------------------------------------------
    # Evaluation and logging

    def _evaluate(self, epoch: int) -> None:
        cfg = self.cfg
        start = time.perf_counter()
        self._share_rank0_buffers()
        self._check_weights_finite()  # NaN embeddings would end the run in the metrics, naming no epoch
        try:
            metrics = evaluate_loaders(
                self.raw_model.embed, self.query_loader, self.gallery_loader, device=self.device,
                recall_at=cfg.recall_at, map_at=cfg.map_at, ap_mode=cfg.ap_mode,
                autocast_dtype=self.amp_dtype, channels_last=cfg.channels_last, progress=self.is_main,
            )
        except NonFiniteEmbeddings as bad:  # finite weights can still embed to NaN (e.g. BatchNorm on flat images)
            self._diverged(f"embeddings at evaluation ({bad})")
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
            for name, buffer in self.raw_model.named_buffers():
                if not name.startswith("head."):  # the head is not evaluated; a shard's are its own
                    dist.broadcast(buffer, src=0)

    def _log(self, record: dict[str, Any]) -> None:
        """One summary line on the console and one JSON line in metrics.jsonl (rank 0)."""
        self.history.append(record)
        if not self.is_main:
            return
        self.run_dir.append_metrics(record)
        print(format_record(record, self.cfg.total_epochs), flush=True)

    def _wait_for_all(self) -> None:
        """Every rank leaves only after rank 0's snapshot is on disk, so a launcher that ends the
        job when its first task exits (srun --kill-on-bad-exit) cannot interrupt the write."""
        if self.world_size > 1:
            dist.barrier()

    def _say(self, text: str) -> None:
        if self.is_main:
            print(text, flush=True)

    def _start_run_dir(self, changes: dict[str, tuple[Any, Any]]) -> None:
        """config.toml of this run, metrics.jsonl made to agree with the snapshot it resumes, a
        resumes.jsonl line for settings the resume changed, and no temporaries of killed writes."""
        stale = self.run_dir.remove_stale_temporaries()
        if stale:
            self._say(f"removed {len(stale)} temporary file(s) of interrupted writes: {', '.join(p.name for p in stale)}")
        if changes:
            self.run_dir.record_resume(self.epochs_run, self.step_in_epoch, changes)
            self._say("resumed with " + ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in changes.items()))
        self.run_dir.start(dump_toml(self.cfg), self.history)

    # ------------------------------------------------------------------------------------
    # Snapshots

    def _save_snapshot(self) -> None:
        self._check_weights_finite()
        progress = Progress(self.epochs_run, self.step_in_epoch, self.history, self.best)
        snapshot = capture(self.raw_model, self.optimizer, self.scaler, progress, self.schedule, self.cfg)
        if snapshot is not None:  # rank 0
            write_snapshot(snapshot, self.snapshot_path)
            print(f"snapshot saved {position_text(self.epochs_run, self.step_in_epoch)} to {self.snapshot_path}",
                  flush=True)
        self.saved_at = (self.epochs_run, self.step_in_epoch)

    def _load_snapshot(self) -> dict[str, tuple[Any, Any]]:
        """Resumes from the newest snapshot, if any; returns the settings this run changes."""
        snapshot = fetch_newest_snapshot(self.snapshot_path, self.device)
        if snapshot is None:
            return {}
        changes = check_resume(snapshot, self.snapshot_path, self.cfg, self._num_classes(), self.schedule)
        progress = restore(snapshot, self.raw_model, self.optimizer, self.scaler)
        self.epochs_run, self.step_in_epoch = progress.epochs_run, progress.step_in_epoch
        self.history, self.best = progress.history, progress.best
        self.saved_at = (self.epochs_run, self.step_in_epoch)
        self._say(f"resuming from snapshot {self.snapshot_path} {position_text(self.epochs_run, self.step_in_epoch)}")
        return changes

    def _num_classes(self) -> int:
        return self.raw_model.head.num_classes
