"""GPU check: a short real training run, ResNet-50 and the foundation recipes' ViTs' training speed.

    python bench/gpu_check.py [--budget_s 320] [--out DIR] [--compile_backend inductor|eager|off]
    python bench/gpu_check.py --quick      # CPU, tiny sizes: exercises every section in seconds

Sections, each guarded (an error is printed and the next section runs; a section that would not
fit in what is left of --budget_s is skipped and says so):

  correctness  single_gpu.py on configs/smoke.toml with bf16 autocast and channels_last for 3
               epochs, then again to epoch 4, which must resume from the snapshot: every epoch's
               loss finite, the last below the first, evaluation lines at epochs 0 and 4, and
               the snapshot loads (weights_only) into a freshly built model
  train        ResNet-50 + ArcFace head (3,997 classes) forward / cross-entropy / backward /
               SGD step (Nesterov, weight decay, as the recipe) on synthetic GPU tensors, bf16,
               channels_last, at 224 px (batch 128/256/384) and 448 px (32/64/96); an OOM ends
               the batch search for that size
  inference    model.embed at each size, as the evaluation runs it (eval mode, inference_mode)
  compile      torch.compile at the best eager batch of each size (224 px first, 448 px last);
               the first step (compilation) is reported as compile_s and excluded from the timing
  trainer      Trainer._run_epoch at the best 224 px batch: the project's own step path, with
               the batch on the GPU, then copied each step from pageable and from pinned host memory
  cudnn        the best 224 px batch again with torch.backends.cudnn.benchmark = True
  <recipe>_train, <recipe>_compile
               the ViTs of configs/inshop_vits16_dino.toml (ViT-S/16) and inshop_vitb16_clip.toml
               (ViT-B/16) at 224 px, bf16, random weights: training images/s (the recipe's AdamW
               over its parameter groups, layer decay and head multiple included; batch search),
               inference, then torch.compile at the best batch. Skipped where timm is missing.

Throughput is timed after warm-up steps, between torch.cuda.synchronize() calls. The summary gives
images/s, peak memory, and what one In-Shop epoch (25,882 training images), its evaluation
(26,830 query + gallery images) and the 50-epoch recipe (50 epochs + 51 evaluations) would take
at those speeds, and the hours of each ViT recipe (its total_epochs and evaluations), ignoring
data loading. Results go to stdout and, after every section, to
<out>/gpu_check.json (--out, else $OUT when set). Without CUDA and without --quick the script
prints "no CUDA device: skipping" and exits 0. Exit status 1 when a section failed.
"""
from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from anywhere without installing

from arcface.model import build_model  # noqa: E402
from bench.bench_trainer import BatchLoader  # noqa: E402
from support.config import Config, load_toml  # noqa: E402
from job import make_optimizer  # noqa: E402
from support.schedule import make_schedule  # noqa: E402
from support.atomicfile import atomic_write_text  # noqa: E402
from support.snapshot import read_snapshot  # noqa: E402
from trainer import Trainer  # noqa: E402

NUM_CLASSES = 3997  # In-Shop training items
TRAIN_IMAGES = 25_882
EVAL_IMAGES = 14_218 + 12_612  # query + gallery
RECIPE_EPOCHS = 50
TARGET_224_IMAGES_PER_S = 3000.0
# The foundation recipes whose ViTs are timed, by config file.
VIT_RECIPES = ("inshop_vits16_dino", "inshop_vitb16_clip")
VIT_BATCHES = {"inshop_vits16_dino": (128, 256, 512), "inshop_vitb16_clip": (64, 128, 256)}


@dataclass
class Plan:
    """What to run: the full GPU plan, or tiny CPU sizes for --quick."""

    device: torch.device
    arch: str
    batches: dict[int, tuple[int, ...]]  # image size -> batch sizes to try, ascending
    eval_batch: int
    warmup_steps: int
    timed_steps: int
    amp: str  # launcher flag value and autocast choice: "bf16" or "off"
    compile_backend: str  # "inductor", "eager" (dynamo only, no code generation) or "off"
    launcher_env: dict[str, str] = field(default_factory=dict)
    seconds_needed: dict[str, float] = field(default_factory=dict)  # section -> estimate
    recipe: Config | None = None  # a recipe's model settings and optimizer (None: ResNet-50 with SGD)

    @property
    def amp_dtype(self) -> torch.dtype | None:
        return torch.bfloat16 if self.amp == "bf16" else None


def full_plan(compile_backend: str) -> Plan:
    return Plan(
        device=torch.device("cuda"), arch="resnet50", batches={224: (128, 256, 384), 448: (32, 64, 96)},
        eval_batch=256, warmup_steps=5, timed_steps=15, amp="bf16", compile_backend=compile_backend,
        seconds_needed={"correctness": 90, "train": 45, "inference": 15, "trainer": 45, "cudnn": 20,
                        "compile": 90, "vit_train": 45, "vit_compile": 90},
    )


def quick_plan(compile_backend: str) -> Plan:
    # amp off and one thread: bf16 convolutions are very slow on CPUs without bf16 units.
    return Plan(
        device=torch.device("cpu"), arch="resnet18", batches={32: (2, 4), 48: (2,)},
        eval_batch=4, warmup_steps=1, timed_steps=2, amp="off", compile_backend=compile_backend,
        launcher_env={"OMP_NUM_THREADS": "1"},
        seconds_needed={"correctness": 20, "train": 5, "inference": 2, "trainer": 5, "cudnn": 5, "compile": 15,
                        "vit_train": 5, "vit_compile": 15},
    )


# ------------------------------------------------------------------------------------------
# Running sections within a time budget, saving results as they come


class Report:
    """Results by section, printed as they come and rewritten to <out>/gpu_check.json each time."""

    def __init__(self, out_dir: Path | None, budget_s: float) -> None:
        self.out_dir = out_dir
        self.deadline = time.monotonic() + budget_s
        self.results: dict[str, Any] = {}
        self.failed: list[str] = []

    def seconds_left(self) -> float:
        return self.deadline - time.monotonic()

    def run(self, name: str, needs_s: float, section: Callable[[], Any]) -> Any:
        """The section's result, or None when it was skipped or failed (both recorded)."""
        if self.seconds_left() < needs_s:
            reason = f"skipped: {self.seconds_left():.0f} s left of the budget, the section needs ~{needs_s:.0f} s"
            print(f"[{name}] {reason}", flush=True)
            self.add(name, {"skipped": reason})
            return None
        print(f"[{name}] running ({self.seconds_left():.0f} s left)", flush=True)
        start = time.monotonic()
        try:
            result = section()
        except Exception as error:  # every section is independent: report and move on
            traceback.print_exc()
            self.failed.append(name)
            self.add(name, {"error": f"{type(error).__name__}: {error}"[:2000]})
            return None
        finally:
            release_memory()
        print(f"[{name}] done in {time.monotonic() - start:.1f} s", flush=True)
        self.add(name, result)
        return result

    def add(self, name: str, value: Any) -> None:
        self.results[name] = value
        if self.out_dir is not None:
            atomic_write_text(self.out_dir / "gpu_check.json", json.dumps(self.results, indent=1, default=str) + "\n")


def release_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ------------------------------------------------------------------------------------------
# Correctness: the real launcher, a resume, the snapshot


def launch(args: list[str], env: dict[str, str], log: Path, timeout_s: float) -> str:
    """Runs a launcher in the repository root; its output goes to `log` (also when it fails)."""
    command = [sys.executable, *args]
    try:
        completed = subprocess.run(command, cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1", **env},
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired as timeout:
        output = timeout.output.decode(errors="replace") if isinstance(timeout.output, bytes) else timeout.output
        log.write_text(output or "")
        raise RuntimeError(f"{' '.join(args)} did not finish in {timeout_s:.1f} s; output in {log.name}") from None
    log.write_text(completed.stdout)
    if completed.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} exited {completed.returncode}; end of its output:\n"
                           f"{completed.stdout[-3000:]}")
    return completed.stdout


def check_training_run(plan: Plan, work_dir: Path, out_dir: Path | None, timeout_s: float) -> dict[str, Any]:
    run_dir = work_dir / "smoke"
    device = "cuda" if plan.device.type == "cuda" else "cpu"
    common = ["single_gpu.py", "--config", "configs/smoke.toml", "--device", device, "--amp", plan.amp,
              "--channels_last", "true", "--save_every", "1", "--out_dir", str(run_dir),
              "--synthetic_dir", str(work_dir / "synthetic")]
    logs = work_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    try:
        launch([*common, "--total_epochs", "3"], plan.launcher_env, logs / "first.log", timeout_s / 2)
        resumed_output = launch([*common, "--total_epochs", "4"], plan.launcher_env, logs / "resume.log",
                                timeout_s / 2)
    finally:  # the launcher logs come back with the results, above all when a run failed
        if out_dir is not None:
            shutil.copytree(logs, out_dir / "smoke", dirs_exist_ok=True)
            if (run_dir / "metrics.jsonl").exists():
                shutil.copy(run_dir / "metrics.jsonl", out_dir / "smoke" / "metrics.jsonl")
    return judge_training_run(run_dir, resumed_output)


def judge_training_run(run_dir: Path, resumed_output: str) -> dict[str, Any]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    checks = metrics_checks(records, resumed_output, epochs=4)
    checks["snapshot_reloads"] = snapshot_reloads(run_dir / "snapshot.pt", expected_epochs=4)
    failed = [name for name, ok in checks.items() if not ok]
    losses = [r["loss"] for r in records if "loss" in r]
    evals = [r for r in records if "recall@1" in r]
    if failed:
        raise AssertionError(f"failed checks {failed}; losses {losses}; evaluations {evals}")
    return {**checks, "losses": losses, "recall@1": [r["recall@1"] for r in evals]}


def metrics_checks(records: list[dict[str, Any]], resumed_output: str, epochs: int) -> dict[str, bool]:
    """What metrics.jsonl and the resumed run's output must show after `epochs` epochs."""
    losses = [r["loss"] for r in records if "loss" in r]
    evals = [r for r in records if "recall@1" in r]
    return {
        "epochs_trained": [r["epoch"] for r in records if "loss" in r] == list(range(1, epochs + 1)),
        "loss_finite": bool(losses) and all(math.isfinite(loss) for loss in losses),
        "loss_falling": len(losses) >= 2 and losses[-1] < losses[0],
        "evaluation_ran": {0, epochs} <= {r["epoch"] for r in evals}
                          and all(0.0 <= r["recall@1"] <= 100.0 for r in evals),
        "resumed_from_snapshot": "resuming from snapshot" in resumed_output,
    }


def snapshot_reloads(path: Path, expected_epochs: int) -> bool:
    snapshot = read_snapshot(path)
    model = build_model(snapshot.num_classes, arch=snapshot.config["arch"])
    model.load_state_dict(snapshot.model, strict=True)
    return snapshot.epochs_run == expected_epochs


# ------------------------------------------------------------------------------------------
# Throughput


def synthetic_batch(batch: int, size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    images = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=torch.channels_last)
    labels = torch.randint(NUM_CLASSES, (batch,), device=device)
    return images, labels


def new_model(plan: Plan, size: int) -> nn.Module:
    """The plan's model for `size` px images (random weights: nothing is downloaded)."""
    torch.manual_seed(0)
    recipe = plan.recipe
    settings = dict(scale=recipe.scale, margin=recipe.margin, drop_path=recipe.drop_path) if recipe else {}
    model = build_model(NUM_CLASSES, arch=plan.arch, image_size=size, **settings)
    return model.to(plan.device, memory_format=torch.channels_last)


def recipe_optimizer(plan: Plan, model: nn.Module) -> torch.optim.Optimizer:
    if plan.recipe is not None:  # the recipe's own optimizer and parameter groups
        return make_optimizer(plan.recipe, model, make_schedule(plan.recipe, TRAIN_IMAGES, world_size=1))
    # The reference recipe's SGD; a tiny lr keeps random-label training finite, at the same cost.
    return torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9, nesterov=True, weight_decay=5e-4)


def train_step(model: Callable, optimizer: torch.optim.Optimizer, plan: Plan,
               images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The Trainer's step without its bookkeeping: autocast forward, float32 loss, backward, SGD."""
    with torch.autocast(plan.device.type, dtype=plan.amp_dtype or torch.float32, enabled=plan.amp_dtype is not None):
        loss = model(images, labels)  # the head's loss, float32
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def time_calls(step: Callable[[], Any], plan: Plan, images_per_call: int) -> dict[str, float]:
    """First call (compilation, cuDNN set-up), warm-up calls, then timed calls between synchronizations."""
    if plan.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(plan.device)
    synchronize(plan.device)
    start = time.perf_counter()
    step()
    synchronize(plan.device)
    first_call_s = time.perf_counter() - start
    for _ in range(plan.warmup_steps):
        step()
    synchronize(plan.device)
    start = time.perf_counter()
    for _ in range(plan.timed_steps):
        last = step()
    synchronize(plan.device)
    seconds = time.perf_counter() - start
    result = {"images_per_s": plan.timed_steps * images_per_call / seconds,
              "step_ms": 1000 * seconds / plan.timed_steps, "first_call_s": first_call_s}
    if isinstance(last, torch.Tensor) and last.dim() == 0 and not torch.isfinite(last):
        raise FloatingPointError(f"non-finite loss {last.item()} during the timed steps")
    if plan.device.type == "cuda":
        result["peak_gib"] = torch.cuda.max_memory_allocated(plan.device) / 2**30
    return result


def measure_training(plan: Plan, size: int, batch: int, compiled: bool) -> dict[str, Any]:
    model = new_model(plan, size)
    optimizer = recipe_optimizer(plan, model)
    forward = model
    if compiled:
        torch._dynamo.reset()  # a fresh compilation: its time is reported, not hidden in a cache
        forward = torch.compile(model, backend=plan.compile_backend, dynamic=False)
    images, labels = synthetic_batch(batch, size, plan.device)
    timing = time_calls(lambda: train_step(forward, optimizer, plan, images, labels), plan, batch)
    if compiled:
        timing["compile_s"] = timing["first_call_s"]
    return {"size": size, "batch": batch, "compiled": compiled, **timing}


def batch_search(plan: Plan, size: int, batches: tuple[int, ...], compiled: bool) -> dict[str, Any]:
    """Every batch in `batches` (ascending) until one runs out of memory; the best is the fastest."""
    rows = []
    for batch in batches:
        try:
            row = measure_training(plan, size, batch, compiled)
        except torch.OutOfMemoryError:
            row = {"size": size, "batch": batch, "compiled": compiled, "oom": True}
        release_memory()
        print_row(row)
        rows.append(row)
        if row.get("oom"):
            break
    fitting = [row for row in rows if not row.get("oom")]
    if not fitting:
        raise RuntimeError(f"{size} px: no batch in {list(batches)} fits in memory")
    best = max(fitting, key=lambda row: row["images_per_s"])
    return {"rows": rows, "best": best, "largest_fitting_batch": max(row["batch"] for row in fitting)}


def compiled_at_best(plan: Plan, size: int, eager: dict[str, Any]) -> dict[str, Any]:
    """torch.compile at the best eager batch, then at smaller ones while it runs out of memory.

    One batch size, not a search: every new shape is another compilation of a minute or more.
    """
    rows = []
    for batch in sorted((b for b in plan.batches[size] if b <= eager["best"]["batch"]), reverse=True):
        try:
            row = measure_training(plan, size, batch, compiled=True)
        except torch.OutOfMemoryError:
            row = {"size": size, "batch": batch, "compiled": True, "oom": True}
        release_memory()
        print_row(row)
        rows.append(row)
        if not row.get("oom"):
            return {"rows": rows, "best": row, "eager_images_per_s": eager["best"]["images_per_s"],
                    "speedup": row["images_per_s"] / eager["best"]["images_per_s"]}
    raise RuntimeError(f"{size} px: compiled training ran out of memory at every batch in {rows}")


def measure_inference(plan: Plan, size: int) -> dict[str, Any]:
    model = new_model(plan, size).eval()
    batch = plan.eval_batch
    while True:
        images, _ = synthetic_batch(batch, size, plan.device)

        def embed() -> torch.Tensor:
            with torch.inference_mode(), torch.autocast(plan.device.type, dtype=plan.amp_dtype or torch.float32,
                                                        enabled=plan.amp_dtype is not None):
                return model.embed(images)

        try:
            row = {"size": size, "batch": batch, **time_calls(embed, plan, batch)}
            print(f"  inference {size} px, batch {batch}: {row['images_per_s']:.0f} images/s")
            return row
        except torch.OutOfMemoryError:
            if batch == 1:
                raise
            batch //= 2
            release_memory()


def host_or_device_batch(plan: Plan, batch: int, size: int, source: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch already on the device, or in host memory as a loader hands it over (NCHW float32),
    pageable (the launchers' prepare_dataloader default) or pinned (pin_memory=True)."""
    if source == "device":
        return synthetic_batch(batch, size, plan.device)
    images = torch.randn(batch, 3, size, size)
    labels = torch.randint(NUM_CLASSES, (batch,))
    if source == "pinned":
        images, labels = images.pin_memory(), labels.pin_memory()
    return images, labels


def measure_trainer_path(plan: Plan, batch: int, size: int) -> dict[str, Any]:
    """Trainer._run_epoch over one batch repeated: the autocast, GradScaler, lr and loss-check path,
    with the batch on the device and, on CUDA, copied from pageable or pinned host memory."""
    sources = ("device", "pageable", "pinned") if plan.device.type == "cuda" else ("device",)
    rows = {source: trainer_epoch_speed(plan, batch, size, source) for source in sources}
    for source, row in rows.items():
        print(f"  Trainer._run_epoch {size} px, batch {batch}, batches from {source} memory: "
              f"{row['images_per_s']:.0f} images/s, {row['step_ms']:.1f} ms/step", flush=True)
    return rows


def trainer_epoch_speed(plan: Plan, batch: int, size: int, source: str) -> dict[str, Any]:
    steps = plan.warmup_steps + plan.timed_steps
    images, labels = host_or_device_batch(plan, batch, size, source)
    with tempfile.TemporaryDirectory() as out_dir:
        cfg = Config(total_epochs=2, out_dir=out_dir, device=plan.device.type, amp=plan.amp,
                     channels_last=True, batch_size=batch, arch=plan.arch, lr=1e-4, lr_batch_size=batch,
                     warmup_epochs=0.0, num_workers=0, log_every=10)
        model = new_model(plan, size)
        schedule = make_schedule(cfg, steps * batch)
        loader = BatchLoader([(images, labels)] * steps)
        trainer = Trainer(cfg, model, loader, make_optimizer(cfg, model, schedule), schedule, [], [], plan.device)
        trainer._run_epoch(0)  # warm-up epoch
        trainer.step_in_epoch = 0
        synchronize(plan.device)
        start = time.perf_counter()
        trainer._run_epoch(1)
        synchronize(plan.device)
        seconds = time.perf_counter() - start
    return {"size": size, "batch": batch, "source": source, "images_per_s": steps * batch / seconds,
            "step_ms": 1000 * seconds / steps}


def measure_with_cudnn_benchmark(plan: Plan, size: int, batch: int) -> dict[str, Any]:
    previous = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    try:
        row = measure_training(plan, size, batch, compiled=False)
    finally:
        torch.backends.cudnn.benchmark = previous
    print_row(row, note="cudnn.benchmark")
    return row


# ------------------------------------------------------------------------------------------
# The foundation recipes' ViTs


def vit_plan(plan: Plan, name: str) -> Plan:
    """The plan of a recipe's ViT: its config's model settings and optimizer, random weights, at its
    crop (224 px); with --quick the smallest timm ViT at 32 px under the same recipe."""
    values = {**load_toml(ROOT / "configs" / f"{name}.toml"), "pretrained": "", "data_root": ""}
    if plan.device.type == "cpu":
        values.update(arch="timm/vit_tiny_patch16_224", resize=36, crop=32)
        batches = {32: (2,)}
    else:
        batches = {values["crop"]: VIT_BATCHES[name]}
    return replace(plan, arch=values["arch"], batches=batches, recipe=Config(**values))


def vit_training(plan: Plan) -> dict[str, Any]:
    """Batch search (eager) and inference speed at the recipe's crop, with what the projection needs."""
    (size,) = plan.batches
    result = batch_search(plan, size, plan.batches[size], compiled=False)
    result["inference"] = measure_inference(plan, size)
    return {**result, "arch": plan.arch, "epochs": plan.recipe.total_epochs, "eval_every": plan.recipe.eval_every}


def vit_compiled(plan: Plan, eager: dict[str, Any]) -> dict[str, Any]:
    (size,) = plan.batches
    return compiled_at_best(plan, size, eager)


def run_vit_sections(plan: Plan, report: Report) -> None:
    need = plan.seconds_needed
    if importlib.util.find_spec("timm") is None:
        for name in VIT_RECIPES:
            report.add(f"{name}_train", {"skipped": "timm is not installed (pip install timm)"})
        return
    eager = {name: report.run(f"{name}_train", need["vit_train"], lambda name=name: vit_training(vit_plan(plan, name)))
             for name in VIT_RECIPES}
    for name in VIT_RECIPES:
        if eager[name] and plan.compile_backend != "off":
            report.run(f"{name}_compile", need["vit_compile"],
                       lambda name=name: vit_compiled(vit_plan(plan, name), eager[name]))


def evaluations(epochs: int, eval_every: int) -> int:
    """How many evaluations a run of `epochs` makes: the untrained model, every eval_every, the end."""
    return len(set(range(0, epochs + 1, eval_every)) | {epochs})


def recipe_projection(epochs: int, eval_every: int, train_ips: float, eval_ips: float | None) -> dict[str, float]:
    """Hours of a recipe's training and of the whole run (its evaluations included) at these speeds."""
    train_s = epochs * TRAIN_IMAGES / train_ips
    eval_s = evaluations(epochs, eval_every) * EVAL_IMAGES / eval_ips if eval_ips else float("nan")
    return {"train_h": train_s / 3600, "run_h": (train_s + eval_s) / 3600}


def summarise_recipes(results: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for name in VIT_RECIPES:
        train = results.get(f"{name}_train") or {}
        compiled = (results.get(f"{name}_compile") or {}).get("best")
        for mode, best in (("eager", train.get("best")), ("compiled", compiled)):
            if best:
                eval_ips = (train.get("inference") or {}).get("images_per_s")
                rows.append({"recipe": name, "mode": mode, "batch": best["batch"], "images_per_s": best["images_per_s"],
                             "epochs": train["epochs"],
                             **recipe_projection(train["epochs"], train["eval_every"], best["images_per_s"], eval_ips)})
    if rows:
        print(f"{'recipe':<20}{'mode':<10}{'batch':>6}{'img/s':>8}{'epochs':>8}{'train h':>9}{'with eval h':>13}")
    for row in rows:
        print(f"{row['recipe']:<20}{row['mode']:<10}{row['batch']:>6}{row['images_per_s']:>8.0f}{row['epochs']:>8}"
              f"{row['train_h']:>9.2f}{row['run_h']:>13.2f}")
    return rows


# ------------------------------------------------------------------------------------------
# Output


def print_row(row: dict[str, Any], note: str = "") -> None:
    mode = "compiled" if row["compiled"] else "eager"
    label = f"  train {row['size']} px, {mode}, batch {row['batch']}{', ' + note if note else ''}: "
    if row.get("oom"):
        print(label + "out of memory", flush=True)
        return
    memory = f", peak {row['peak_gib']:.1f} GiB" if "peak_gib" in row else ""
    compile_note = f", compile {row['compile_s']:.1f} s" if "compile_s" in row else ""
    print(label + f"{row['images_per_s']:.0f} images/s, {row['step_ms']:.1f} ms/step{memory}{compile_note}",
          flush=True)


def projections(train_ips: float, eval_ips: float | None) -> dict[str, float]:
    """Seconds of one In-Shop epoch and its evaluation, hours of the recipe, at these speeds."""
    epoch_s = TRAIN_IMAGES / train_ips
    eval_s = EVAL_IMAGES / eval_ips if eval_ips else float("nan")
    recipe_s = RECIPE_EPOCHS * epoch_s + (RECIPE_EPOCHS + 1) * (eval_s if eval_ips else 0.0)
    return {"epoch_s": epoch_s, "eval_s": eval_s, "recipe_h": recipe_s / 3600}


def summarise(plan: Plan, results: dict[str, Any]) -> dict[str, Any]:
    rows = []
    for size in plan.batches:
        eval_row = results.get(f"inference_{size}") or {}
        for key, mode in ((f"train_{size}", "eager"), (f"compile_{size}", "compiled")):
            best = (results.get(key) or {}).get("best")
            if best:
                rows.append({"size": size, "mode": mode, "batch": best["batch"],
                             "images_per_s": best["images_per_s"], "peak_gib": best.get("peak_gib"),
                             **projections(best["images_per_s"], eval_row.get("images_per_s"))})
    print(f"{'px':>4} {'mode':<9}{'batch':>6}{'img/s':>8}{'peak GiB':>9}{'epoch s':>9}{'eval s':>8}"
          f"{'50-epoch recipe h':>19}")
    for row in rows:
        peak = f"{row['peak_gib']:.1f}" if row["peak_gib"] is not None else "-"
        print(f"{row['size']:>4} {row['mode']:<9}{row['batch']:>6}{row['images_per_s']:>8.0f}{peak:>9}"
              f"{row['epoch_s']:>9.1f}{row['eval_s']:>8.1f}{row['recipe_h']:>19.2f}")
    at_224 = [row["images_per_s"] for row in rows if row["size"] == 224]
    summary: dict[str, Any] = {"rows": rows, "recipes": summarise_recipes(results)}
    if at_224:
        summary["best_224_images_per_s"] = max(at_224)
        summary["target_224_met"] = max(at_224) >= TARGET_224_IMAGES_PER_S
        print(f"best at 224 px: {max(at_224):.0f} images/s (target {TARGET_224_IMAGES_PER_S:.0f}): "
              f"{'met' if summary['target_224_met'] else 'NOT met'}")
    return summary


def environment(plan: Plan) -> dict[str, Any]:
    info: dict[str, Any] = {"torch": torch.__version__, "device": str(plan.device), "arch": plan.arch,
                            "amp": plan.amp, "compile_backend": plan.compile_backend}
    if plan.device.type == "cuda":
        info.update(name=torch.cuda.get_device_name(plan.device), cuda=torch.version.cuda,
                    cudnn=torch.backends.cudnn.version(),
                    capability=".".join(map(str, torch.cuda.get_device_capability(plan.device))),
                    memory_gib=torch.cuda.get_device_properties(plan.device).total_memory / 2**30,
                    bf16=torch.cuda.is_bf16_supported())
    print("  " + ", ".join(f"{k} {v}" for k, v in info.items()), flush=True)
    return info


# ------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="CPU, tiny sizes: checks the script itself")
    parser.add_argument("--budget_s", type=float, default=540.0, help="seconds for all sections (default 540)")
    parser.add_argument("--out", default=os.environ.get("OUT") or None, help="folder for gpu_check.json (default $OUT)")
    parser.add_argument("--work_dir", default=None, help="training runs go here (default: a temporary folder)")
    parser.add_argument("--compile_backend", default=None, choices=("inductor", "eager", "off"),
                        help="torch.compile backend (default inductor; eager with --quick)")
    parser.add_argument("--skip_correctness", action="store_true")
    return parser.parse_args(argv)


def run_all(plan: Plan, report: Report, work_dir: Path, skip_correctness: bool) -> None:
    """Cheap, decisive sections first: the first compilation (the likeliest way to reach the 224 px
    target), then the recipes' ViTs, before the Trainer and cuDNN comparisons; the second
    compilation last."""
    need = plan.seconds_needed
    report.run("environment", 0, lambda: environment(plan))
    if not skip_correctness:
        report.run("correctness", need["correctness"], lambda: check_training_run(
            plan, work_dir, report.out_dir, max(report.seconds_left() - 10, need["correctness"])))
    eager = {size: report.run(f"train_{size}", need["train"], lambda size=size: batch_search(
        plan, size, plan.batches[size], compiled=False)) for size in plan.batches}
    for size in plan.batches:
        report.run(f"inference_{size}", need["inference"], lambda size=size: measure_inference(plan, size))
    small, large = plan.batches
    if eager[small] and plan.compile_backend != "off":
        report.run(f"compile_{small}", need["compile"], lambda: compiled_at_best(plan, small, eager[small]))
    run_vit_sections(plan, report)
    if eager[small]:
        best_batch = eager[small]["best"]["batch"]
        report.run("trainer", need["trainer"], lambda: measure_trainer_path(plan, best_batch, small))
        if plan.device.type == "cuda":
            report.run("cudnn_benchmark", need["cudnn"],
                       lambda: measure_with_cudnn_benchmark(plan, small, best_batch))
    if eager[large] and plan.compile_backend != "off":
        report.run(f"compile_{large}", need["compile"], lambda: compiled_at_best(plan, large, eager[large]))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.quick and not torch.cuda.is_available():
        print("no CUDA device: skipping")
        return 0
    backend = args.compile_backend or ("eager" if args.quick else "inductor")
    plan = quick_plan(backend) if args.quick else full_plan(backend)
    if args.quick:
        torch.set_num_threads(1)
    report = Report(Path(args.out) if args.out else None, args.budget_s)
    with tempfile.TemporaryDirectory() as scratch:
        work_dir = Path(args.work_dir) if args.work_dir else Path(scratch)
        run_all(plan, report, work_dir, args.skip_correctness)
    report.add("summary", summarise(plan, report.results))
    report.add("failed_sections", report.failed)
    print(json.dumps({"bench": "gpu_check", "quick": args.quick, **report.results}, default=str))
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
