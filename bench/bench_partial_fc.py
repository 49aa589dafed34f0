"""Partial FC against the dense ArcFace head on CPU: per-process head memory and step time (gloo).

    python bench/bench_partial_fc.py [--classes 100000 200000 1000000] [--dim 512] [--batch 128]
                                     [--modes dense pfc1 pfc0.1] [--steps 3] [--world 2]
                                     [--ram_fraction 0.7]
    python bench/bench_partial_fc.py --study unsampled [--seeds 3]

One job per (classes, mode), `--world` processes started with torch.multiprocessing spawn, one
thread each, on embedding-level synthetic inputs: each process holds (batch / world, dim) random
"backbone outputs" (leaf tensors with requires_grad, so the embedding gradient is computed) and
random labels. A step is forward + backward + SGD step (momentum 0.9, weight decay 5e-4).
  dense    ArcFaceHead(dim, classes) in DDP (gradient_as_bucket_view, as the Trainer): every
           process holds the whole head and all-reduces its gradient; F.cross_entropy.
  pfcR     PartialFCHead(dim, classes, sample_rate=R): each process its shard; no head all-reduce.
Memory per process:
  state    weight + gradient + optimizer state, from the tensors' sizes (the head's own memory);
           for Partial FC also the gathered global batch (features and labels: O(batch x dim)).
  peak     peak RSS during the timed steps minus RSS before the head was built (VmHWM, reset
           through /proc/self/clear_refs after the warm-up step): state plus activations and
           temporaries. init_peak: the same for building the head.
Step time: the slowest process's wall time per step (a barrier before each), median of --steps
after one warm-up step.

RAM guard: a job runs only if its estimated memory (all processes) fits in --ram_fraction of
MemAvailable; the dense head's estimate is 8 x its weight per process (weight, gradient,
momentum, and ArcFaceHead's normalised copy of the weight, its gradient and the normalisation's
temporaries: measured 7.5x at 100k classes, 8.5x at 200k in DDP) plus activations: 1M classes
x 512-d needs ~17 GiB per process, so on a 24 GiB machine it is skipped. A skipped job is listed
with the memory it would need (`--classes 1000000 --modes dense` runs it where RAM allows), and
the Partial FC rows of that class count are then compared with the dense step time extrapolated
linearly from the dense jobs that ran (marked *): the head's work is linear in the class count.

--study unsampled: what unsampled rows should receive at r < 1 (the decision in
arcface/partial_fc.py), on one process: 2000 classes, 64-d embeddings of Gaussian clusters
(separated: 300 steps; overlapping: 900 steps) through a linear layer, SGD batch 128 at
r = 0.1, plain SGD (weight decay and momentum touch every row) against frozen unsampled rows
(weight and momentum restored after each step), and r = 1 for reference; full-softmax loss and
top-1 (nearest class row) on 4000 held-out samples, over --seeds seeds. About 2 minutes.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere without installing

from arcface.head import ArcFaceHead  # noqa: E402
from arcface.partial_fc import PartialFCHead  # noqa: E402
from support.runtime import exit_process, free_port  # noqa: E402

GIB = 2**30
DENSE_PEAK_WEIGHTS = 8  # the dense head's peak per process, in weight sizes (see the docstring)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--classes", type=int, nargs="+", default=[100_000, 200_000, 1_000_000])
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--batch", type=int, default=128, help="global batch (all processes)")
    parser.add_argument("--modes", nargs="+", default=["dense", "pfc1", "pfc0.1"],
                        help="dense, or pfcR for Partial FC at sample rate R")
    parser.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up step")
    parser.add_argument("--world", type=int, default=2, help="processes")
    parser.add_argument("--ram_fraction", type=float, default=0.7,
                        help="run a job only if its estimate fits in this fraction of MemAvailable")
    parser.add_argument("--study", choices=("unsampled",), help="the unsampled-rows study instead")
    parser.add_argument("--seeds", type=int, default=3, help="--study: runs per variant")
    args = parser.parse_args(argv)
    for mode in args.modes:
        if mode != "dense" and not (mode.startswith("pfc") and 0 < _rate(mode) <= 1):
            parser.error(f"--modes: expected dense or pfcR with R in (0, 1], got {mode!r}")
    if args.batch % args.world:
        parser.error(f"--batch {args.batch} must be divisible by --world {args.world}")
    return args


def _rate(mode: str) -> float:
    try:
        return float(mode[3:])
    except ValueError:
        return -1.0


# ------------------------------------------------------------------------------------------
# Memory


def _rss_bytes(field: str) -> int:
    """VmRSS or VmHWM (peak) of this process, in bytes."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_peak() -> None:
    """Sets VmHWM back to the current RSS (Linux: writing 5 to clear_refs)."""
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")


def available_bytes() -> int:
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no MemAvailable in /proc/meminfo")


def estimate_bytes(mode: str, classes: int, args: argparse.Namespace) -> int:
    """Estimated peak memory of one job, all processes together."""
    weight = classes * args.dim * 4
    if mode == "dense":
        activations = 6 * (args.batch // args.world) * classes * 4
        per_process = DENSE_PEAK_WEIGHTS * weight + activations
    else:
        shard = weight / args.world
        activations = 5 * args.batch * (classes / args.world) * _rate(mode) * 4
        # weight, gradient, momentum and SGD's weight-decay temporary (measured: peak 5x the
        # shard at 200k classes, r = 1); the dense init draws the whole weight once.
        per_process = max(4 * shard + activations, weight + shard)
    return int(args.world * per_process + args.world * 0.5 * GIB)  # + the interpreter and torch


# ------------------------------------------------------------------------------------------
# Inside each process


def worker(rank: int, world: int, port: int, mode: str, classes: int, args: argparse.Namespace,
           result_path: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        result = _measure(rank, world, mode, classes, args)
        if rank == 0:
            Path(result_path).write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()
    exit_process(0)  # measured and written: the interpreter's teardown cannot fail the run


def _measure(rank: int, world: int, mode: str, classes: int, args: argparse.Namespace) -> dict:
    local_batch = args.batch // world
    generator = torch.Generator().manual_seed(rank)
    features = torch.randn(local_batch, args.dim, generator=generator).requires_grad_(True)
    labels = torch.randint(classes, (local_batch,), generator=generator)
    gc.collect()
    base_rss = _rss_bytes("VmRSS")
    _reset_peak()
    torch.manual_seed(0)
    if mode == "dense":
        head = ArcFaceHead(args.dim, classes)
        model = DDP(head, gradient_as_bucket_view=True)

        def loss_fn() -> torch.Tensor:
            return F.cross_entropy(model(features, labels), labels)
    else:
        head = PartialFCHead(args.dim, classes, sample_rate=_rate(mode))

        def loss_fn() -> torch.Tensor:
            return head(features, labels, step)
    init_peak = _rss_bytes("VmHWM") - base_rss
    optimizer = torch.optim.SGD(head.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    seconds, state_bytes, peak = [], 0, 0
    for step in range(args.steps + 1):
        dist.barrier()
        if step == 1:  # after the warm-up step: momentum exists, buckets are built
            gc.collect()
            _reset_peak()
        start = time.perf_counter()
        loss_fn().backward()
        optimizer.step()
        if step == args.steps:
            state_bytes = _head_state_bytes(head, optimizer)
        optimizer.zero_grad(set_to_none=True)
        features.grad = None
        elapsed = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
        if step:
            seconds.append(elapsed.item())
    peak = _rss_bytes("VmHWM") - base_rss
    extra = 0 if mode == "dense" else args.batch * (args.dim * 4 + 8)  # gathered features + labels
    numbers = torch.tensor([state_bytes + extra, peak, init_peak], dtype=torch.float64)
    dist.all_reduce(numbers, op=dist.ReduceOp.MAX)  # the largest process
    state, peak, init_peak = numbers.tolist()
    return {"mode": mode, "classes": classes, "state_gib": state / GIB, "peak_gib": peak / GIB,
            "init_peak_gib": init_peak / GIB, "step_s": statistics.median(seconds), "steps_s": seconds}


def _head_state_bytes(head: nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Weight + gradient + optimizer state of the head, from the tensors' sizes."""
    total = 0
    for param in head.parameters():
        total += param.numel() * param.element_size()
        if param.grad is not None:
            total += param.grad.numel() * param.grad.element_size()
        for value in optimizer.state.get(param, {}).values():
            if torch.is_tensor(value):
                total += value.numel() * value.element_size()
    return total


# ------------------------------------------------------------------------------------------
# The parent


def run_job(mode: str, classes: int, args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        result_path = os.path.join(folder, "result.json")
        mp.spawn(worker, args=(args.world, free_port(), mode, classes, args, result_path), nprocs=args.world)
        return json.loads(Path(result_path).read_text())


def benchmark(args: argparse.Namespace) -> dict:
    rows = []
    for classes in args.classes:
        for mode in args.modes:
            need, have = estimate_bytes(mode, classes, args), available_bytes()
            if need > args.ram_fraction * have:
                rows.append({"mode": mode, "classes": classes, "skipped": f"needs ~{need / GIB:.1f} GiB, "
                             f"{have / GIB:.1f} GiB available (x{args.ram_fraction:g} allowed)"})
                print(f"{classes:>9} {mode:>8}  skipped: {rows[-1]['skipped']}", flush=True)
                continue
            start = time.perf_counter()
            row = run_job(mode, classes, args)
            row["job_s"] = time.perf_counter() - start
            rows.append(row)
            print(f"{classes:>9} {mode:>8}  state {row['state_gib']:.3f} GiB  peak {row['peak_gib']:.3f} GiB  "
                  f"step {row['step_s']:.2f} s  ({row['job_s']:.0f} s)", flush=True)
    return {"bench": "partial_fc", "world": args.world, "dim": args.dim, "batch": args.batch,
            "load_average": os.getloadavg()[0], "rows": _with_ratios(rows, args)}


def _with_ratios(rows: list[dict], args: argparse.Namespace) -> list[dict]:
    """Adds state / (dense state / world) and step / dense step where the dense job ran.

    Where it was skipped, the dense step is extrapolated linearly in the class count from the
    dense jobs that ran (at least two; the head's work is linear in it), and the dense state is
    its exact size (weight, gradient, momentum: 3 x classes x dim x 4 bytes).
    """
    dense = {row["classes"]: row for row in rows if row["mode"] == "dense" and "skipped" not in row}
    fit = None
    if len(dense) >= 2:
        (c0, t0), (c1, t1) = [(c, dense[c]["step_s"]) for c in sorted(dense)[-2:]]
        fit = lambda classes: t0 + (t1 - t0) * (classes - c0) / (c1 - c0)  # noqa: E731
    for row in rows:
        if "skipped" in row or row["mode"] == "dense":
            continue
        reference = dense.get(row["classes"])
        dense_state = reference["state_gib"] if reference else 3 * row["classes"] * args.dim * 4 / GIB
        row["state_vs_dense_over_world"] = row["state_gib"] / (dense_state / args.world)
        if reference:
            row["step_vs_dense"] = row["step_s"] / reference["step_s"]
        elif fit is not None:
            row["dense_step_s_extrapolated"] = fit(row["classes"])
            row["step_vs_dense_extrapolated"] = row["step_s"] / row["dense_step_s_extrapolated"]
    return rows


def print_table(result: dict) -> None:
    print(f"\n{result['world']} processes x 1 thread, global batch {result['batch']} x {result['dim']}-d, "
          f"load average {result['load_average']:.1f}")
    print(f"{'classes':>9} {'mode':>8} {'state GiB':>10} {'peak GiB':>9} {'init GiB':>9} {'step s':>8} "
          f"{'state/(dense/world)':>20} {'step/dense':>11}")
    for row in result["rows"]:
        if "skipped" in row:
            print(f"{row['classes']:>9} {row['mode']:>8}  skipped: {row['skipped']}")
            continue
        ratios = [f"{row[key]:.3f}" if key in row else "-" for key in ("state_vs_dense_over_world", "step_vs_dense")]
        if "step_vs_dense_extrapolated" in row:
            ratios[1] = f"{row['step_vs_dense_extrapolated']:.3f}*"
        print(f"{row['classes']:>9} {row['mode']:>8} {row['state_gib']:>10.3f} {row['peak_gib']:>9.3f} "
              f"{row['init_peak_gib']:>9.3f} {row['step_s']:>8.2f} {ratios[0]:>20} {ratios[1]:>11}")
    if any("step_vs_dense_extrapolated" in row for row in result["rows"]):
        print("* against the dense step time extrapolated linearly from the dense jobs that ran")


# ------------------------------------------------------------------------------------------
# --study unsampled


# Two problems: well separated clusters (top-1 near 1 after 300 steps) and overlapping ones.
STUDY_PROBLEMS = {"separated": dict(spread=1.5, steps=300), "overlapping": dict(spread=0.6, steps=900)}


def study_unsampled(seeds: int) -> dict:
    torch.set_num_threads(1)
    variants = {"dense r=1": (1.0, False), "r=0.1 sgd": (0.1, False), "r=0.1 frozen": (0.1, True)}
    summary: dict = {}
    print(f"\n{'problem':>12} {'variant':>13} {'held-out loss':>14} {'top-1':>7}   (mean of {seeds} seeds; min-max)")
    for problem, settings in STUDY_PROBLEMS.items():
        summary[problem] = {}
        for name, (rate, frozen) in variants.items():
            results = [_toy_run(rate, frozen, seed, **settings) for seed in range(seeds)]
            losses, tops = [r["loss"] for r in results], [r["top1"] for r in results]
            summary[problem][name] = {"loss": statistics.mean(losses), "top1": statistics.mean(tops), "runs": results}
            print(f"{problem:>12} {name:>13} {statistics.mean(losses):>14.3f} {statistics.mean(tops):>7.3f}   "
                  f"loss {min(losses):.3f}-{max(losses):.3f}, top-1 {min(tops):.3f}-{max(tops):.3f}", flush=True)
    return {"bench": "partial_fc_unsampled", "problems": STUDY_PROBLEMS, "variants": summary}


def _toy_run(rate: float, frozen: bool, seed: int, classes: int = 2000, dim: int = 64,
             steps: int = 300, batch: int = 128, spread: float = 1.5, lr: float = 0.1) -> dict:
    data_rng = torch.Generator().manual_seed(1000 + seed)
    centres = spread * torch.randn(classes, dim, generator=data_rng)

    def samples(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        labels = torch.randint(classes, (n,), generator=data_rng)
        return centres[labels] + torch.randn(n, dim, generator=data_rng), labels

    held_out = samples(4000)
    torch.manual_seed(seed)
    embedding = nn.Linear(dim, dim)
    head = PartialFCHead(dim, classes, scale=32.0, margin=0.3, sample_rate=rate, seed=seed)
    optimizer = torch.optim.SGD([*embedding.parameters(), head.weight], lr=lr, momentum=0.9, weight_decay=5e-4)
    for step in range(steps):
        x, y = samples(batch)
        loss = head(embedding(x), y, step)
        loss.backward()
        if frozen:
            keep = torch.ones(classes, dtype=torch.bool)
            keep[head.last_sampled] = False  # the unsampled rows
            state = optimizer.state.get(head.weight, {})
            momentum = state.get("momentum_buffer")
            saved = (head.weight.detach()[keep].clone(),
                     momentum[keep].clone() if momentum is not None else torch.zeros(int(keep.sum()), dim))
        optimizer.step()
        if frozen:
            with torch.no_grad():
                head.weight[keep] = saved[0]
                optimizer.state[head.weight]["momentum_buffer"][keep] = saved[1]
        optimizer.zero_grad(set_to_none=True)
    with torch.no_grad():
        features = embedding(held_out[0])
        head.sample_rate = 1.0
        loss = head(features, held_out[1]).item()
        cos = F.normalize(features) @ F.normalize(head.weight).T
        top1 = (cos.argmax(1) == held_out[1]).float().mean().item()
    return {"seed": seed, "loss": loss, "top1": top1}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.study == "unsampled":
        result = study_unsampled(args.seeds)
    else:
        start = time.perf_counter()
        result = benchmark(args)
        result["total_s"] = time.perf_counter() - start
        print_table(result)
        print(f"total {result['total_s']:.0f} s")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
