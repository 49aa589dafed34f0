"""Trainer overhead: images/s of the Trainer's step path against a bare training loop.

    python bench/bench_trainer.py [--arch resnet18 --image_size 56 --batch_size 32 --steps 4
                                   --repeats 9 --threads 1]

All variants train one model instance with one optimizer on the same in-memory synthetic batches
(no decoding, no loader workers), so the difference between them is what the Trainer adds:

  bare          for images, labels in batches: model(images, labels) (the loss) -> backward
                -> SGD step -> zero_grad
  trainer       Trainer._run_epoch over prepare_dataloader(TensorDataset): the real path, with
                EpochSampler, SeededDataset (per-sample fork_rng), collate, autocast context,
                GradScaler, per-step lr, the per-step loss check (`.tolist()`) and the tqdm bar
  trainer_batches  Trainer._run_epoch over the pre-made batches: the Trainer without its loader

Runs alternate in one process after one warm-up round, in an order that rotates every round, so
drift on a shared machine hits every variant alike; ratios are medians of each round's ratio.
Wall time and process CPU time are both reported: with other work on the cores, CPU time is the
steadier measure of how much work a loop does. A second table prices each per-step addition on
its own, and what the loader would cost with SeededDataset seeding only the CPU generator. The
defaults are the demo's training shape (resnet18, 56 px crops, batch 32).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch.utils.data import DataLoader, TensorDataset
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere without installing

from arcface.model import RetrievalModel, build_model  # noqa: E402
from support.config import Config  # noqa: E402
from datautils import SeededDataset, prepare_dataloader  # noqa: E402
from job import make_optimizer  # noqa: E402
from support.schedule import make_schedule  # noqa: E402
from trainer import Trainer  # noqa: E402

VARIANTS = ("bare", "trainer", "trainer_batches")
Batch = tuple[torch.Tensor, torch.Tensor]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="resnet18", choices=("resnet18", "resnet34", "resnet50"))
    parser.add_argument("--image_size", type=int, default=56)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--num_classes", type=int, default=3997, help="In-Shop's training classes")
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps per timed run")
    parser.add_argument("--repeats", type=int, default=9, help="timed runs of each variant (a multiple of 3 rotates the order evenly)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (intra-op)")
    args = parser.parse_args(argv)
    for name in ("image_size", "batch_size", "num_classes", "steps", "repeats", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    return args


class BatchLoader:
    """Pre-made batches behind the two things Trainer._run_epoch uses: `sampler.set_epoch` and iteration."""

    def __init__(self, batches: list[Batch]) -> None:
        self.batches = batches
        self.sampler = self

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        pass  # the same batches every epoch: only their cost matters here

    def __iter__(self) -> Iterator[Batch]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def synthetic_batches(args: argparse.Namespace) -> list[Batch]:
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(args.steps * args.batch_size, 3, args.image_size, args.image_size, generator=generator)
    labels = torch.randint(args.num_classes, (len(images),), generator=generator)
    return list(zip(images.split(args.batch_size), labels.split(args.batch_size)))


def bench_config(args: argparse.Namespace, out_dir: str) -> Config:
    # A tiny lr keeps random-label training finite for every run; the path is the same at any lr.
    return Config(total_epochs=2 * (args.repeats + 1), out_dir=out_dir, device="cpu", amp="off",
                  num_workers=0, batch_size=args.batch_size, arch=args.arch, lr=1e-4,
                  lr_batch_size=args.batch_size, warmup_epochs=0.0, log_every=10)


def bare_epoch(model: RetrievalModel, optimizer: torch.optim.Optimizer, batches: list[Batch]) -> None:
    model.train()
    for images, labels in batches:
        loss = model(images, labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def trainer_epoch(trainer: Trainer, loader: object, epoch: int) -> None:
    trainer.train_data = loader
    trainer._run_epoch(epoch)
    trainer.step_in_epoch = 0  # what train() does after each epoch


def timed(run: Callable[[], None]) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of one call."""
    wall, cpu = time.perf_counter(), time.process_time()
    run()
    return time.perf_counter() - wall, time.process_time() - cpu


def alternate(runs: dict[str, Callable[[], None]], repeats: int) -> dict[str, list[tuple[float, float]]]:
    """One untimed warm-up round, then `repeats` rounds of every variant, the order rotating each
    round so that no variant always runs first (after another variant's run) or last."""
    for run in runs.values():
        run()
    names = list(runs)
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in runs}
    for round_index in range(repeats):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            times[name].append(timed(runs[name]))
    return times


def microseconds_per_call(run: Callable[[], object], calls: int) -> float:
    """Best of three batches of calls: the cost itself, not the machine's noise."""
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(calls):
            run()
        best = min(best, (time.perf_counter() - start) / calls)
    return best * 1e6


class CpuSeededDataset(SeededDataset):
    """SeededDataset seeding only the CPU generator, the one CPU-side transforms draw from.

    torch.manual_seed also seeds every accelerator backend; where CUDA is not initialised (a CPU
    machine, a loader worker) each of those calls records a formatted stack trace for later.
    """

    def __getitem__(self, key: tuple[int, int]):
        index, seed = key
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)
            return self.dataset[index]


def step_costs(trainer: Trainer, dataset: TensorDataset, args: argparse.Namespace) -> dict[str, float]:
    """Microseconds per optimizer step of each thing the Trainer adds to a bare step."""
    loader = prepare_dataloader(dataset, trainer.schedule, num_workers=0, seed=0)
    loader.sampler.set_epoch(0)
    cpu_seeded_loader = DataLoader(CpuSeededDataset(dataset), batch_size=args.batch_size,
                                   sampler=loader.sampler, drop_last=True)
    keys = list(loader.sampler)[: args.batch_size]
    seeded, cpu_seeded = SeededDataset(dataset), CpuSeededDataset(dataset)
    plain_get = microseconds_per_call(lambda: [dataset[index] for index, _ in keys], 5)
    fork_rng = microseconds_per_call(lambda: [seeded[key] for key in keys], 5)
    cpu_fork_rng = microseconds_per_call(lambda: [cpu_seeded[key] for key in keys], 5)
    loss = torch.tensor(5.0)
    with open(os.devnull, "w") as devnull:
        bar = tqdm(total=10**9, mininterval=30.0, leave=False, file=devnull)
        bar_update = microseconds_per_call(lambda: bar.update(1), 200)
        bar.close()
    return {
        "loader_per_step": microseconds_per_call(lambda: list(loader), 2) / len(loader),
        "seeded_fork_rng_per_step": fork_rng - plain_get,
        "loader_cpu_seed_per_step": microseconds_per_call(lambda: list(cpu_seeded_loader), 2) / len(loader),
        "cpu_seed_fork_rng_per_step": cpu_fork_rng - plain_get,
        "agree_on_step": microseconds_per_call(lambda: trainer._agree_on_step(loss), 200),
        "stack_tolist": microseconds_per_call(lambda: torch.stack([loss, loss, loss]).tolist(), 200),
        "tqdm_update": bar_update,
    }


def load_average() -> float:
    return os.getloadavg()[0]


def summarise(times: dict[str, list[tuple[float, float]]], images_per_run: int) -> dict[str, dict[str, float]]:
    summary = {}
    for name, runs in times.items():
        ratios_wall = [bare[0] / run[0] for bare, run in zip(times["bare"], runs)]
        ratios_cpu = [bare[1] / run[1] for bare, run in zip(times["bare"], runs)]
        summary[name] = {
            "images_per_s_wall": images_per_run / statistics.median(w for w, _ in runs),
            "images_per_s_cpu": images_per_run / statistics.median(c for _, c in runs),
            "ratio_wall": statistics.median(ratios_wall),
            "ratio_cpu": statistics.median(ratios_cpu),
            "ratio_wall_min": min(ratios_wall),  # the spread shows how noisy the machine was
            "ratio_wall_max": max(ratios_wall),
        }
    return summary


def print_report(args: argparse.Namespace, summary: dict, costs: dict, loads: tuple[float, float]) -> None:
    print(f"{args.arch}, {args.image_size}x{args.image_size} px, batch {args.batch_size}, "
          f"{args.num_classes} classes, {args.steps} steps per run, {args.repeats} runs each, "
          f"{torch.get_num_threads()} thread(s), load average {loads[0]:.2f} -> {loads[1]:.2f}")
    print(f"{'variant':<17}{'img/s wall':>11}{'img/s CPU':>11}{'vs bare wall':>14}{'vs bare CPU':>13}"
          f"{'wall ratio range':>19}")
    for name, row in summary.items():
        print(f"{name:<17}{row['images_per_s_wall']:>11.1f}{row['images_per_s_cpu']:>11.1f}"
              f"{row['ratio_wall']:>14.3f}{row['ratio_cpu']:>13.3f}"
              f"{row['ratio_wall_min']:>11.3f}..{row['ratio_wall_max']:.3f}")
    bare_step_us = 1e6 * args.batch_size / summary["bare"]["images_per_s_cpu"]
    print(f"per-step costs outside the model (bare step: {bare_step_us / 1000:.1f} ms CPU)")
    for name, micros in costs.items():
        print(f"  {name:<26}{micros:>9.1f} us  {100 * micros / bare_step_us:>6.2f} % of a step")


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    batches = synthetic_batches(args)
    dataset = TensorDataset(torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches]))
    model = build_model(args.num_classes, arch=args.arch)
    load_before = load_average()
    with tempfile.TemporaryDirectory() as out_dir:
        cfg = bench_config(args, out_dir)
        schedule = make_schedule(cfg, len(dataset))
        optimizer = make_optimizer(cfg, model, schedule)
        loader = prepare_dataloader(dataset, schedule, num_workers=0, seed=cfg.seed)
        trainer = Trainer(cfg, model, loader, optimizer, schedule, dataset, dataset, torch.device("cpu"))
        epochs = iter(range(cfg.total_epochs))
        batch_loader = BatchLoader(batches)
        runs = {
            "bare": lambda: bare_epoch(model, optimizer, batches),
            "trainer": lambda: trainer_epoch(trainer, loader, next(epochs)),
            "trainer_batches": lambda: trainer_epoch(trainer, batch_loader, next(epochs)),
        }
        times = alternate(runs, args.repeats)
        costs = step_costs(trainer, dataset, args)
    loads = (load_before, load_average())
    summary = summarise(times, args.steps * args.batch_size)
    print_report(args, summary, costs, loads)
    result = {
        "bench": "trainer_overhead", "arch": args.arch, "image_size": args.image_size,
        "batch_size": args.batch_size, "num_classes": args.num_classes, "steps": args.steps,
        "repeats": args.repeats, "threads": torch.get_num_threads(), "torch": torch.__version__,
        "load_average": [round(x, 2) for x in loads],
        "variants": {name: {k: round(v, 4) for k, v in row.items()} for name, row in summary.items()},
        "step_costs_us": {k: round(v, 1) for k, v in costs.items()},
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
