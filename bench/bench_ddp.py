"""DDP scaling on CPU: images/s of 1 process x 1 thread against 2 processes x 1 thread (gloo).

    python bench/bench_ddp.py [--arch resnet18 --image_size 56 --batch_size 32 --steps 4
                               --repeats 3 --rounds 2] [--sweep]

Each process trains the same model on its own in-memory synthetic batches (same per-process
batch, no data loading) with forward -> cross_entropy -> backward -> SGD step. One process runs
the model without DDP (as the Trainer does without a process group); two processes started with
torch.multiprocessing spawn on a free port wrap it in DDP with the Trainer's settings
(gradient_as_bucket_view=True). Efficiency = 2-process images/s / (2 x 1-process images/s).

To see what limits it, the two-process job also times (interleaved with the DDP runs)
  no_sync     the same steps without the gradient all-reduce: compute alone, with both processes
              sharing the machine (memory bandwidth, other users' load)
  all_reduce  one all-reduce of a flat float32 tensor as large as all gradients
and, with --sweep, DDP variants: bucket_cap_mb 100, static_graph, gradient_as_bucket_view off,
and bf16 gradient compression (a DDP communication hook).
Variants alternate inside each job after a warm-up run; jobs alternate (1, 2, 1, 2, ...) for
--rounds rounds; figures are medians. A run's time is the slowest process's. CPU efficiency
(1-process CPU time per step / 2-process CPU time per step and process) is what the efficiency
would be if each process had a core to itself: on a shared machine, wall-time efficiency also
measures how much of two cores the other users leave.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel as DDP

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere without installing

from arcface.model import build_model  # noqa: E402
from support.runtime import exit_process, free_port  # noqa: E402

Batch = tuple[torch.Tensor, torch.Tensor]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="resnet18", choices=("resnet18", "resnet34", "resnet50"))
    parser.add_argument("--image_size", type=int, default=56)
    parser.add_argument("--batch_size", type=int, default=32, help="per process")
    parser.add_argument("--num_classes", type=int, default=3997, help="In-Shop's training classes")
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps per timed run")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each variant per job")
    parser.add_argument("--rounds", type=int, default=2, help="1-process and 2-process jobs, alternated")
    parser.add_argument("--sweep", action="store_true", help="also time DDP settings (bucket size, ...)")
    args = parser.parse_args(argv)
    for name in ("image_size", "batch_size", "num_classes", "steps", "repeats", "rounds"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    return args


# ------------------------------------------------------------------------------------------
# Inside each process


def synthetic_batches(args: argparse.Namespace, rank: int) -> list[Batch]:
    generator = torch.Generator().manual_seed(1000 + rank)  # each rank its own shard
    images = torch.randn(args.steps * args.batch_size, 3, args.image_size, args.image_size, generator=generator)
    labels = torch.randint(args.num_classes, (len(images),), generator=generator)
    return list(zip(images.split(args.batch_size), labels.split(args.batch_size)))


def ddp_variants(model: nn.Module, sweep: bool) -> dict[str, DDP]:
    """DDP wrappers of independent copies of `model`: hooks of two wrappers on one module would mix."""
    settings = {"ddp": dict(gradient_as_bucket_view=True)}  # the Trainer's settings
    if sweep:
        settings.update({
            "bucket_100mb": dict(gradient_as_bucket_view=True, bucket_cap_mb=100),
            "static_graph": dict(gradient_as_bucket_view=True, static_graph=True),
            "no_bucket_view": dict(gradient_as_bucket_view=False),
            "bf16_compress": dict(gradient_as_bucket_view=True),
        })
    wrapped = {name: DDP(copy.deepcopy(model), **kw) for name, kw in settings.items()}
    if "bf16_compress" in wrapped:
        wrapped["bf16_compress"].register_comm_hook(dist.group.WORLD, default_hooks.bf16_compress_hook)
    return wrapped


def train_steps(model: nn.Module, optimizer: torch.optim.Optimizer, batches: list[Batch], sync: bool) -> None:
    model.train()
    no_sync = model.no_sync if (isinstance(model, DDP) and not sync) else None
    for images, labels in batches:
        if no_sync is None:
            loss = model(images, labels)
            loss.backward()
        else:
            with no_sync():
                loss = model(images, labels)
                loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def timed_everywhere(run: Callable[[], None], world_size: int) -> tuple[float, float]:
    """(slowest process's wall seconds, mean CPU seconds per process) of one call on every process."""
    if world_size > 1:
        dist.barrier()  # start together, so the slowest process's time is the job's time
    wall, cpu = time.perf_counter(), time.process_time()
    run()
    times = torch.tensor([time.perf_counter() - wall, time.process_time() - cpu], dtype=torch.float64)
    if world_size > 1:
        slowest, cpu_sum = times.clone(), times.clone()
        dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
        dist.all_reduce(cpu_sum)
        return slowest[0].item(), cpu_sum[1].item() / world_size
    return times[0].item(), times[1].item()


def all_reduce_seconds(numel: int, repeats: int) -> float:
    flat = torch.ones(numel)
    dist.all_reduce(flat)  # warm-up: connection buffers
    seconds = []
    for _ in range(repeats):
        dist.barrier()
        start = time.perf_counter()
        dist.all_reduce(flat)
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


def worker(rank: int, world_size: int, port: int, args: argparse.Namespace, result_path: str) -> None:
    torch.set_num_threads(1)
    if world_size > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        torch.manual_seed(0)  # the same initial weights in every process
        model = build_model(args.num_classes, arch=args.arch)
        batches = synthetic_batches(args, rank)
        if world_size == 1:
            models: dict[str, nn.Module] = {"single": model}
        else:
            models = {**ddp_variants(model, args.sweep), "no_sync": DDP(copy.deepcopy(model))}
        runs = {name: make_run(m, batches, sync=name != "no_sync") for name, m in models.items()}
        for run in runs.values():
            run()  # warm-up
        times: dict[str, list] = {name: [] for name in runs}
        names = list(runs)
        for round_index in range(args.repeats):
            shift = round_index % len(names)  # rotate: no variant always runs first
            for name in names[shift:] + names[:shift]:
                times[name].append(timed_everywhere(runs[name], world_size))
        result = {"world_size": world_size, "times": times}
        if world_size > 1:
            numel = sum(p.numel() for p in model.parameters())
            result["all_reduce_s"] = all_reduce_seconds(numel, args.repeats * 2)
            result["gradient_mib"] = numel * 4 / 2**20
        if rank == 0:
            Path(result_path).write_text(json.dumps(result))
    finally:
        if world_size > 1:
            dist.destroy_process_group()
    exit_process(0)  # measured and written: the interpreter's teardown cannot fail the run


def make_run(model: nn.Module, batches: list[Batch], sync: bool) -> Callable[[], None]:
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    return lambda: train_steps(model, optimizer, batches, sync=sync)


# ------------------------------------------------------------------------------------------
# The parent


def run_job(world_size: int, args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        result_path = os.path.join(folder, "result.json")
        mp.spawn(worker, args=(world_size, free_port(), args, result_path), nprocs=world_size)
        return json.loads(Path(result_path).read_text())


def summarise(jobs: list[dict], args: argparse.Namespace) -> dict:
    per_variant: dict[str, list] = {}
    extras: dict[str, list] = {"all_reduce_s": [], "gradient_mib": []}
    for job in jobs:
        for name, runs in job["times"].items():
            per_variant.setdefault(name, []).extend(runs)
        for key in extras:
            if key in job:
                extras[key].append(job[key])
    summary: dict = {"variants": {}}
    for name, runs in per_variant.items():
        world = 1 if name == "single" else 2
        images = world * args.steps * args.batch_size
        summary["variants"][name] = {
            "images_per_s": images / statistics.median(wall for wall, _ in runs),
            "step_ms": 1000 * statistics.median(wall for wall, _ in runs) / args.steps,
            "cpu_step_ms": 1000 * statistics.median(cpu for _, cpu in runs) / args.steps,
        }
    single = summary["variants"]["single"]
    for row in summary["variants"].values():
        row["efficiency"] = row["images_per_s"] / (2 * single["images_per_s"]) if row is not single else 1.0
        # What the efficiency would be if every process had a core to itself: CPU time per step.
        row["cpu_efficiency"] = single["cpu_step_ms"] / row["cpu_step_ms"]
    # Both timed in the same job, interleaved: the cost of DDP itself, whatever else the machine runs.
    summary["ddp_vs_no_sync"] = summary["variants"]["ddp"]["images_per_s"] / summary["variants"]["no_sync"]["images_per_s"]
    summary["all_reduce_ms"] = 1000 * statistics.median(extras["all_reduce_s"])
    summary["gradient_mib"] = extras["gradient_mib"][0]
    return summary


def print_report(args: argparse.Namespace, summary: dict, loads: tuple[float, float], seconds: float) -> None:
    print(f"{args.arch}, {args.image_size}x{args.image_size} px, batch {args.batch_size} per process, "
          f"{args.num_classes} classes, {args.steps} steps per run, {args.repeats} runs x {args.rounds} rounds, "
          f"1 thread per process, gloo, load average {loads[0]:.2f} -> {loads[1]:.2f}, {seconds:.0f} s")
    print(f"{'variant':<16}{'processes':>10}{'img/s':>9}{'step ms':>9}{'CPU ms/step':>13}{'efficiency':>12}"
          f"{'CPU efficiency':>16}")
    for name, row in summary["variants"].items():
        world = 1 if name == "single" else 2
        print(f"{name:<16}{world:>10}{row['images_per_s']:>9.1f}{row['step_ms']:>9.1f}"
              f"{row['cpu_step_ms']:>13.1f}{row['efficiency']:>12.3f}{row['cpu_efficiency']:>16.3f}")
    variants = summary["variants"]
    exposed = variants["ddp"]["step_ms"] - variants["no_sync"]["step_ms"]
    print(f"all-reduce of all gradients ({summary['gradient_mib']:.0f} MiB float32) alone: "
          f"{summary['all_reduce_ms']:.1f} ms; step time DDP adds over no_sync: {exposed:.1f} ms "
          f"(ddp / no_sync images/s, interleaved in one job: {summary['ddp_vs_no_sync']:.3f})")


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    start, load_before = time.perf_counter(), os.getloadavg()[0]
    jobs = []
    for _ in range(args.rounds):
        for world_size in (1, 2):
            jobs.append(run_job(world_size, args))
    summary = summarise(jobs, args)
    loads = (load_before, os.getloadavg()[0])
    print_report(args, summary, loads, time.perf_counter() - start)
    result = {
        "bench": "ddp_scaling", "arch": args.arch, "image_size": args.image_size,
        "batch_size": args.batch_size, "num_classes": args.num_classes, "steps": args.steps,
        "repeats": args.repeats, "rounds": args.rounds, "torch": torch.__version__,
        "load_average": [round(x, 2) for x in loads],
        "efficiency": round(summary["variants"]["ddp"]["efficiency"], 4),
        "ddp_vs_no_sync": round(summary["ddp_vs_no_sync"], 4),
        "variants": {name: {k: round(v, 4) for k, v in row.items()} for name, row in summary["variants"].items()},
        "all_reduce_ms": round(summary["all_reduce_ms"], 2), "gradient_mib": round(summary["gradient_mib"], 1),
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
