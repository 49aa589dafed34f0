"""The same job on any number of processes: equal gradients, and resume at another world size."""

import os
import signal
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from support import runtime
from support.snapshot import SnapshotMismatch, read_snapshot
from toy import init_gloo, toy_config, toy_trainer, spawn
from trainer import Trainer


def _first_step_gradients(trainer: Trainer, out_file: Path) -> None:
    """Runs one epoch; saves the gradients of its first optimizer step and the final parameters."""
    captured = {}
    original = trainer._optimizer_step

    def capture(step: int) -> float:
        if not captured:
            captured.update({name: p.grad.detach().clone() for name, p in trainer.raw_model.named_parameters()})
        return original(step)

    trainer._optimizer_step = capture
    trainer._run_epoch(0)
    if runtime.global_rank() == 0:
        torch.save({"grads": captured, "params": dict(trainer.raw_model.named_parameters())}, out_file)


def _gradient_worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    init_gloo(rank, world_size, port)
    try:
        cfg = toy_config(Path(out_dir) / "run", total_epochs=1, batch_size=4, global_batch_size=24)
        _first_step_gradients(toy_trainer(cfg, batch_norm=True), Path(out_dir) / "result.pt")
    finally:
        dist.destroy_process_group()


def _run(world_size: int, out_dir: Path) -> dict:
    if world_size == 1:
        cfg = toy_config(out_dir / "run", total_epochs=1, batch_size=4, global_batch_size=24)
        _first_step_gradients(toy_trainer(cfg, batch_norm=True), out_dir / "result.pt")
    else:
        spawn(_gradient_worker, args=(world_size, runtime.free_port(), str(out_dir)), nprocs=world_size)
    return torch.load(out_dir / "result.pt", weights_only=True)


def test_one_step_has_the_same_gradients_on_1_2_and_3_processes(tmp_path):
    # global batch 24 of batch 4: 1 x 6, 2 x 3 and 3 x 2 micro-batches, the same six each time
    results = {world: _run(world, tmp_path / f"w{world}") for world in (1, 2, 3)}
    for world in (2, 3):
        for key in ("grads", "params"):
            for name, tensor in results[1][key].items():
                # float rounding only: another summation order of the same terms
                torch.testing.assert_close(results[world][key][name], tensor, rtol=1e-5, atol=1e-5,
                                           msg=lambda m: f"{key} {name}, {world} processes: {m}")
    assert any(g.abs().max() > 0 for g in results[1]["grads"].values())


def _stop_mid_epoch_worker(rank: int, port: int, out_dir: str, stop_at_batch: int | None, recipe: dict | None = None,
                           vit: bool = False) -> None:
    init_gloo(rank, 2, port)
    try:
        cfg = toy_config(out_dir, batch_size=8, global_batch_size=16, **(recipe or {}))
        trainer = toy_trainer(cfg, batch_norm=not vit, vit=vit)
        if stop_at_batch is not None and rank == 0:
            original, calls = trainer._run_batch, {"n": 0}

            def run_batch(*args):
                calls["n"] += 1
                if calls["n"] == stop_at_batch:
                    os.kill(os.getpid(), signal.SIGUSR1)
                return original(*args)

            trainer._run_batch = run_batch
        code = trainer.train()
        (Path(out_dir) / f"code{rank}.txt").write_text(str(code))
    finally:
        dist.destroy_process_group()


def test_a_run_stopped_mid_epoch_on_2_processes_resumes_on_1(tmp_path):
    full, stopped = tmp_path / "full", tmp_path / "stopped"
    spawn(_stop_mid_epoch_worker, args=(runtime.free_port(), str(full), None), nprocs=2)
    spawn(_stop_mid_epoch_worker, args=(runtime.free_port(), str(stopped), 6), nprocs=2)
    assert (stopped / "code0.txt").read_text() == str(128 + signal.SIGUSR1)
    snap = read_snapshot(stopped / "snapshot.pt")
    assert (snap.epochs_run, snap.step_in_epoch, snap.global_batch) == (1, 2, 16)  # 4 steps per epoch

    resumed = toy_trainer(toy_config(stopped, batch_size=8, global_batch_size=16), batch_norm=True)
    assert (resumed.schedule.world_size, resumed.schedule.grad_accum_steps) == (1, 2)
    assert (resumed.epochs_run, resumed.step_in_epoch) == (1, 2)
    assert resumed.train() == 0
    expected = read_snapshot(full / "snapshot.pt").model
    for name, param in resumed.raw_model.named_parameters():
        torch.testing.assert_close(param.detach(), expected[name], rtol=1e-3, atol=1e-5, msg=name)
    # BatchNorm's running statistics legitimately differ: under DDP they follow rank 0's
    # micro-batches, on one process both micro-batches of every step.
    assert not torch.equal(resumed.raw_model.norm.running_mean, expected["norm.running_mean"])


# The fine-tuning recipe of configs/inshop_*_dino/clip.toml on the toy ViT (3 blocks): AdamW, layer
# decay, the head at 10x, no decay on norms, biases, tokens and position embeddings.
# (The configuration names a timm ViT, which layer decay requires; the Trainer gets the toy one.)
ADAMW_RECIPE = dict(optimizer="adamw", lr=0.004, weight_decay=0.05, decay_norm_and_bias=False, layer_decay=0.5,
                    head_lr_mult=10.0, arch="timm/vit_tiny_patch16_224", resize=36, crop=32)


def test_adamw_with_layer_decay_resumes_mid_epoch_exactly(tmp_path, monkeypatch):
    pytest.importorskip("timm")
    cfg = dict(batch_size=8, global_batch_size=16, total_epochs=2, **ADAMW_RECIPE)
    full = toy_trainer(toy_config(tmp_path / "full", **cfg), vit=True)
    assert full.train() == 0
    calls, original = {"n": 0}, Trainer._run_batch

    def stop_at_step_3(self, *args):
        calls["n"] += 1
        if calls["n"] == 5:  # 2 micro-batches per step: the first of step 3
            os.kill(os.getpid(), signal.SIGUSR1)
        return original(self, *args)

    monkeypatch.setattr(Trainer, "_run_batch", stop_at_step_3)
    stopped = toy_trainer(toy_config(tmp_path / "stopped", **cfg), vit=True)
    assert stopped.train() == 128 + signal.SIGUSR1
    monkeypatch.undo()
    resumed = toy_trainer(toy_config(tmp_path / "stopped", **cfg), vit=True)
    assert (resumed.epochs_run, resumed.step_in_epoch) == (0, 3)
    assert resumed.train() == 0
    for name, param in resumed.raw_model.named_parameters():
        assert torch.equal(param, full.raw_model.get_parameter(name)), name  # the same process count: exact
    for index, state in full.optimizer.state_dict()["state"].items():
        assert torch.equal(resumed.optimizer.state_dict()["state"][index]["exp_avg"], state["exp_avg"])


@pytest.mark.slow
def test_adamw_with_layer_decay_stopped_mid_epoch_on_2_processes_resumes_on_1(tmp_path):
    pytest.importorskip("timm")
    full, stopped = tmp_path / "full", tmp_path / "stopped"
    spawn(_stop_mid_epoch_worker, args=(runtime.free_port(), str(full), None, ADAMW_RECIPE, True), nprocs=2)
    spawn(_stop_mid_epoch_worker, args=(runtime.free_port(), str(stopped), 6, ADAMW_RECIPE, True), nprocs=2)
    assert (stopped / "code0.txt").read_text() == str(128 + signal.SIGUSR1)
    snap = read_snapshot(stopped / "snapshot.pt")
    assert (snap.epochs_run, snap.step_in_epoch) == (1, 2)
    assert len(snap.optimizer["param_groups"]) == 10  # stem, 3 blocks, final norm: decay or not; head

    resumed = toy_trainer(toy_config(stopped, batch_size=8, global_batch_size=16, **ADAMW_RECIPE), vit=True)
    assert isinstance(resumed.optimizer, torch.optim.AdamW) and resumed.schedule.world_size == 1
    assert resumed.train() == 0
    expected = read_snapshot(full / "snapshot.pt")
    for name, param in resumed.raw_model.named_parameters():
        got, want = param.detach(), expected.model[name]
        if name.endswith("attn.qkv.bias"):
            # The key bias adds the same number to every logit of a query, which softmax ignores:
            # its gradient is 0 but for rounding, which differs between 1 and 2 processes, and
            # AdamW's normalisation turns that into steps of a fraction of the lr. No output moves.
            keys = slice(16, 32)
            torch.testing.assert_close(got[keys], want[keys], rtol=0, atol=1e-3, msg=name)
            got, want = torch.cat([got[:16], got[32:]]), torch.cat([want[:16], want[32:]])
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-5, msg=name)
    # The moments came through the snapshot: 16 steps of AdamW in both runs, the same averages.
    state = resumed.optimizer.state_dict()["state"]
    for index, saved in expected.optimizer["state"].items():
        assert int(state[index]["step"]) == int(saved["step"]) == 16
        torch.testing.assert_close(state[index]["exp_avg_sq"], saved["exp_avg_sq"], rtol=1e-3, atol=1e-9)
    # Each group ran at the schedule's last lr times its scale: the head at 10x, the stem at 0.5^4.
    last_lr = float(resumed.schedule.lr[-1])
    lrs = sorted({group["lr"] / last_lr for group in resumed.optimizer.param_groups})
    assert lrs == pytest.approx([0.5**4, 0.5**3, 0.5**2, 0.5, 1.0, 10.0])


def test_another_global_batch_mid_epoch_is_refused_and_allowed_at_an_epoch_end(tmp_path, monkeypatch):
    calls = {"n": 0}
    original = Trainer._run_batch

    def stop_at_third(self, *args):
        calls["n"] += 1
        if calls["n"] == 11:  # 4 steps of 2 micro-batches per epoch: step 2 of epoch 2
            os.kill(os.getpid(), signal.SIGUSR1)
        return original(self, *args)

    monkeypatch.setattr(Trainer, "_run_batch", stop_at_third)
    assert toy_trainer(toy_config(tmp_path, batch_size=8, global_batch_size=16)).train() == 128 + signal.SIGUSR1
    monkeypatch.undo()
    with pytest.raises(SnapshotMismatch, match="steps of 16 images, but this run's steps have 8.*--global_batch_size 16"):
        toy_trainer(toy_config(tmp_path, batch_size=8))
    assert toy_trainer(toy_config(tmp_path, batch_size=4, global_batch_size=16)).train() == 0  # 4 x 4 is 16 too


def test_a_global_batch_that_does_not_split_is_a_config_error():
    from support.config import Config, ConfigError
    from support.schedule import make_schedule

    with pytest.raises(ConfigError, match="global_batch_size: 24 is not a multiple of batch_size 8 x 2 processes"):
        make_schedule(Config(batch_size=8, global_batch_size=24), 100, world_size=2)
    with pytest.raises(ConfigError, match="global_batch_size: expected a multiple of batch_size .8., got 20"):
        Config(batch_size=8, global_batch_size=20)
    with pytest.raises(ConfigError, match="grad_accum_steps: derived from global_batch_size"):
        Config(batch_size=8, global_batch_size=16, grad_accum_steps=2)
    assert make_schedule(Config(batch_size=8, global_batch_size=48), 100, world_size=3).grad_accum_steps == 2
