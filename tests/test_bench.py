"""The benchmark scripts run on a CPU with tiny sizes and end with one JSON line; their arithmetic
(ratios, efficiency, epoch projections, batch search, section budget) is checked by hand."""

import json
import math
from pathlib import Path

import pytest
import torch

from bench import bench_ddp, bench_trainer, gpu_check

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def run_main(capsys, monkeypatch):
    """Runs a script's main(argv) in this process (no interpreter start-up): (return value, stdout)."""
    monkeypatch.chdir(ROOT)
    threads = torch.get_num_threads()

    def run(main, argv: list[str]):
        try:
            returned = main(argv)
        finally:
            torch.set_num_threads(threads)  # the scripts pick their own thread count
        return returned, capsys.readouterr().out

    return run


def last_json(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------
# bench_trainer.py


def test_bench_trainer_runs_and_prints_json(run_main):
    returned, stdout = run_main(bench_trainer.main, ["--image_size", "32", "--batch_size", "2", "--steps", "2",
                                                     "--repeats", "1", "--num_classes", "10"])
    result = last_json(stdout)
    assert result == json.loads(json.dumps(returned))
    assert result["bench"] == "trainer_overhead" and result["threads"] == 1
    assert set(result["variants"]) == {"bare", "trainer", "trainer_batches"}
    assert result["variants"]["bare"]["ratio_wall"] == 1.0  # bare against itself
    assert all(row["images_per_s_wall"] > 0 and row["images_per_s_cpu"] > 0 for row in result["variants"].values())
    assert set(result["step_costs_us"]) == {"loader_per_step", "seeded_fork_rng_per_step", "loader_cpu_seed_per_step",
                                            "cpu_seed_fork_rng_per_step", "agree_on_step", "stack_tolist",
                                            "tqdm_update"}
    assert "vs bare wall" in stdout


def test_bench_trainer_ratios_are_medians_of_paired_rounds():
    # (wall, cpu) seconds of three rounds; 8 images per run.
    times = {"bare": [(1.0, 0.5), (2.0, 1.0), (1.0, 0.5)],
             "trainer": [(1.25, 0.5), (2.0, 2.0), (1.0, 1.0)]}
    summary = bench_trainer.summarise(times, images_per_run=8)
    # paired wall ratios 0.8, 1.0, 1.0 -> median 1.0; CPU ratios 1.0, 0.5, 0.5 -> 0.5
    assert summary["trainer"]["ratio_wall"] == pytest.approx(1.0)
    assert summary["trainer"]["ratio_cpu"] == pytest.approx(0.5)
    assert summary["trainer"]["images_per_s_wall"] == pytest.approx(8 / 1.25)  # median wall 1.25 s
    assert summary["bare"]["images_per_s_cpu"] == pytest.approx(8 / 0.5)
    assert (summary["trainer"]["ratio_wall_min"], summary["trainer"]["ratio_wall_max"]) == pytest.approx((0.8, 1.0))


def test_batch_loader_serves_the_trainer_interface():
    batches = [(torch.zeros(2, 3), torch.tensor([0, 1])), (torch.ones(2, 3), torch.tensor([1, 0]))]
    loader = bench_trainer.BatchLoader(batches)
    loader.sampler.set_epoch(3, start_step=2)
    assert len(loader) == 2 and [b[1].tolist() for b in loader] == [[0, 1], [1, 0]]
    import inspect

    from datautils import EpochSampler
    assert inspect.signature(loader.sampler.set_epoch) == inspect.signature(EpochSampler(8, 1, 0, 2).set_epoch)


# ------------------------------------------------------------------------------------------
# bench_ddp.py


def test_bench_ddp_runs_and_prints_json(run_main):
    _, stdout = run_main(bench_ddp.main, ["--image_size", "32", "--batch_size", "2", "--steps", "1",
                                          "--repeats", "1", "--rounds", "1", "--num_classes", "10"])
    result = last_json(stdout)
    assert result["bench"] == "ddp_scaling"
    assert set(result["variants"]) == {"single", "ddp", "no_sync"}
    assert result["efficiency"] == result["variants"]["ddp"]["efficiency"] > 0
    resnet18_trunk = 11_176_512  # torchvision resnet18 without fc
    head = 10 * 512
    assert result["gradient_mib"] == pytest.approx((resnet18_trunk + head) * 4 / 2**20, abs=0.05)


def test_bench_ddp_efficiency_is_two_process_rate_over_twice_one_process():
    args = bench_ddp.parse_args(["--steps", "2", "--batch_size", "4"])
    # 1 process: 2 steps x 4 images in 1.0 s -> 8 images/s; 2 processes: 16 images in 1.25 s.
    jobs = [{"world_size": 1, "times": {"single": [[1.0, 0.9], [3.0, 0.9], [1.0, 0.9]]}},
            {"world_size": 2, "times": {"ddp": [[1.25, 1.0]], "no_sync": [[1.0, 0.8]]},
             "all_reduce_s": 0.02, "gradient_mib": 42.0}]
    summary = bench_ddp.summarise(jobs, args)
    assert summary["variants"]["single"]["images_per_s"] == pytest.approx(8.0)
    assert summary["variants"]["ddp"]["images_per_s"] == pytest.approx(16 / 1.25)
    assert summary["variants"]["ddp"]["efficiency"] == pytest.approx((16 / 1.25) / 16)
    assert summary["variants"]["no_sync"]["efficiency"] == pytest.approx(1.0)
    assert summary["variants"]["ddp"]["step_ms"] == pytest.approx(625.0)
    assert summary["variants"]["ddp"]["cpu_efficiency"] == pytest.approx(0.9 / 1.0)  # CPU s per step: 0.45 / 0.5
    assert summary["all_reduce_ms"] == pytest.approx(20.0)
    assert summary["ddp_vs_no_sync"] == pytest.approx(1.0 / 1.25)  # 16 images in 1.25 s vs in 1.0 s


# ------------------------------------------------------------------------------------------
# gpu_check.py


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without CUDA")
def test_gpu_check_skips_without_cuda(tmp_path, run_main):
    status, stdout = run_main(gpu_check.main, ["--out", str(tmp_path)])
    assert status == 0 and stdout.strip() == "no CUDA device: skipping"
    assert not (tmp_path / "gpu_check.json").exists()


@pytest.mark.slow
def test_gpu_check_quick_runs_every_section(tmp_path, run_main, monkeypatch):
    monkeypatch.setenv("OUT", str(tmp_path))  # where the device runner collects results
    status, stdout = run_main(gpu_check.main, ["--quick"])
    result = last_json(stdout)
    assert status == 0
    assert result["quick"] is True and result["failed_sections"] == []
    correctness = result["correctness"]
    assert correctness["resumed_from_snapshot"] and correctness["snapshot_reloads"]
    assert len(correctness["losses"]) == 4 and all(math.isfinite(x) for x in correctness["losses"])
    for section in ("train_32", "train_48", "inference_32", "inference_48", "compile_32", "trainer", "compile_48",
                    *(f"{name}_{kind}" for name in gpu_check.VIT_RECIPES for kind in ("train", "compile"))):
        assert "error" not in result[section] and "skipped" not in result[section], section
    assert [row["batch"] for row in result["train_32"]["rows"]] == [2, 4]
    assert result["trainer"]["device"]["batch"] == result["train_32"]["best"]["batch"]
    assert {(row["size"], row["mode"]) for row in result["summary"]["rows"]} == {
        (32, "eager"), (32, "compiled"), (48, "eager"), (48, "compiled")}
    assert [(row["recipe"], row["mode"], row["epochs"]) for row in result["summary"]["recipes"]] == [
        ("inshop_vits16_dino", "eager", 30), ("inshop_vits16_dino", "compiled", 30),
        ("inshop_vitb16_clip", "eager", 32), ("inshop_vitb16_clip", "compiled", 32)]
    saved = json.loads((tmp_path / "gpu_check.json").read_text())
    assert saved["summary"] == result["summary"]
    assert (tmp_path / "smoke" / "metrics.jsonl").exists() and (tmp_path / "smoke" / "resume.log").exists()


def test_projections_of_epoch_evaluation_and_recipe():
    out = gpu_check.projections(train_ips=25_882 / 10, eval_ips=26_830 / 4)
    assert out["epoch_s"] == pytest.approx(10.0)
    assert out["eval_s"] == pytest.approx(4.0)
    assert out["recipe_h"] == pytest.approx((50 * 10 + 51 * 4) / 3600)


def test_recipe_hours_count_every_epoch_and_evaluation():
    assert gpu_check.evaluations(30, 1) == 31 and gpu_check.evaluations(30, 4) == 9  # 0, 4, ..., 28, 30
    out = gpu_check.recipe_projection(30, 1, train_ips=25_882 / 36, eval_ips=26_830 / 12)
    assert out["train_h"] == pytest.approx(30 * 36 / 3600)
    assert out["run_h"] == pytest.approx((30 * 36 + 31 * 12) / 3600)


def test_the_vit_plans_are_the_recipes_models_and_optimizers():
    pytest.importorskip("timm")
    full = gpu_check.full_plan("inductor")
    dino, clip = (gpu_check.vit_plan(full, name) for name in gpu_check.VIT_RECIPES)
    assert (dino.arch, dino.batches, clip.arch) == ("timm/vit_small_patch16_224.dino", {224: (128, 256, 512)},
                                                    "timm/vit_base_patch16_clip_224.openai")
    assert clip.recipe.optimizer == "adamw" and clip.recipe.layer_decay == 0.85 and clip.recipe.pretrained == ""
    quick = gpu_check.vit_plan(gpu_check.quick_plan("eager"), "inshop_vitb16_clip")
    assert (quick.arch, quick.batches, quick.recipe.head_lr_mult) == ("timm/vit_tiny_patch16_224", {32: (2,)}, 10.0)


def test_batch_search_stops_at_the_first_oom_and_keeps_the_fastest(monkeypatch):
    speeds = {32: 500.0, 64: 700.0, 96: 650.0}

    def fake_measure(plan, size, batch, compiled):
        if batch > 96:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return {"size": size, "batch": batch, "compiled": compiled, "images_per_s": speeds[batch], "step_ms": 1.0}

    monkeypatch.setattr(gpu_check, "measure_training", fake_measure)
    plan = gpu_check.quick_plan("off")
    found = gpu_check.batch_search(plan, 448, (32, 64, 96, 128, 160), compiled=False)
    assert [row["batch"] for row in found["rows"]] == [32, 64, 96, 128]  # 160 never tried
    assert found["rows"][-1]["oom"] is True
    assert found["best"]["batch"] == 64 and found["largest_fitting_batch"] == 96


def test_report_records_errors_and_skips_and_runs_on(tmp_path):
    report = gpu_check.Report(tmp_path, budget_s=1000.0)

    def broken():
        raise ValueError("bad section")

    assert report.run("broken", 0, broken) is None
    assert report.run("too_long", 10**6, lambda: {"x": 1}) is None
    assert report.run("fine", 0, lambda: {"x": 2}) == {"x": 2}
    saved = json.loads((tmp_path / "gpu_check.json").read_text())
    assert saved["broken"] == {"error": "ValueError: bad section"}
    assert saved["too_long"]["skipped"].startswith("skipped")
    assert saved["fine"] == {"x": 2} and report.failed == ["broken"]


def metrics_lines(losses: list[float]) -> list[dict]:
    records = [{"epoch": 0, "recall@1": 5.0, "mAP@10": 3.0}]
    for epoch, loss in enumerate(losses, start=1):
        records += [{"epoch": epoch, "loss": loss}, {"epoch": epoch, "recall@1": 10.0, "mAP@10": 4.0}]
    return records


def test_metrics_checks_pass_a_good_run_and_name_each_failure():
    good = gpu_check.metrics_checks(metrics_lines([40.0, 38.0, 37.0, 35.0]), "resuming from snapshot x", 4)
    assert all(good.values())
    rising = gpu_check.metrics_checks(metrics_lines([35.0, 38.0, 37.0, 36.0]), "resuming from snapshot", 4)
    assert [k for k, ok in rising.items() if not ok] == ["loss_falling"]
    nan = gpu_check.metrics_checks(metrics_lines([40.0, float("nan"), 37.0, 35.0]), "", 4)
    assert [k for k, ok in nan.items() if not ok] == ["loss_finite", "resumed_from_snapshot"]
    short = gpu_check.metrics_checks(metrics_lines([40.0, 38.0, 37.0]), "resuming from snapshot", 4)
    assert [k for k, ok in short.items() if not ok] == ["epochs_trained", "evaluation_ran"]


# ------------------------------------------------------------------------------------------
# bench_catalog_eval.py


def test_bench_catalog_eval_runs_small_flat_is_exact_and_ends_with_json(run_main):
    pytest.importorskip("faiss", reason="faiss-cpu is an optional extra")
    from bench import bench_catalog_eval

    summary, out = run_main(bench_catalog_eval.main, ["--items", "60", "--queries", "200", "--gallery", "150",
                                                      "--dim", "16", "--kinds", "flat,hnsw", "--ef_search", "80"])
    assert last_json(out) == summary and summary["bench"] == "catalog_eval"
    exact, (flat, hnsw) = summary["exact"], summary["results"]
    assert (flat["kind"], hnsw["kind"]) == ("flat", "hnsw") and hnsw["params"]["ef_search"] == 80
    assert {key: flat[key] for key in ("recall@1", "mAP@10")} == {key: exact[key] for key in ("recall@1", "mAP@10")}
    assert summary["target_met"] == (max(abs(hnsw[k] - exact[k]) for k in ("recall@1", "mAP@10")) <= 0.1)
    assert "target: hnsw Recall@1 and mAP@10 within 0.1 points" in out
