"""A timm trunk with the fine-tuning recipe, end to end on the synthetic set (tiny, random weights, no
downloads): AdamW with layer decay, the head's multiple and stochastic depth; the data, the snapshot
and every tool in the backbone's own preprocessing (CLIP's mean and std, bicubic resize)."""

import json
from pathlib import Path

import pytest
import torch
from torchvision.transforms import v2

pytest.importorskip("timm")

import single_gpu  # noqa: E402 (after the skip: these tests need timm)
from arcface.model import preprocessing_for  # noqa: E402
from arcface.transforms import IMAGENET, NormalizeUint8  # noqa: E402
from datautils import load_datasets  # noqa: E402
from job import load_train_objs  # noqa: E402
from support.config import Config, parse_config  # noqa: E402
from support.snapshot import read_snapshot  # noqa: E402
from tools import evaluate, export, search  # noqa: E402
from tools.api import load_retriever  # noqa: E402
from tools.common import load_model  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# The smallest timm ViT with CLIP's statistics (10 blocks); 32 px crops make 4 patches.
CLIP = "timm/vit_xsmall_patch16_clip_224.tinyclip_yfcc15m"
RECIPE = ["--arch", CLIP, "--resize", "36", "--crop", "32", "--optimizer", "adamw", "--lr", "0.002",
          "--weight_decay", "0.05", "--decay_norm_and_bias", "false", "--layer_decay", "0.75",
          "--head_lr_mult", "10", "--drop_path", "0.1", "--num_workers", "0"]


@pytest.fixture(scope="module")
def synthetic_dir(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("synthetic"))


def recipe(out_dir: Path, synthetic_dir: str, epochs: int = 1) -> Config:
    return parse_config([str(epochs), "--config", str(ROOT / "configs" / "smoke.toml"), *RECIPE,
                         "--out_dir", str(out_dir), "--synthetic_dir", synthetic_dir])


def test_the_data_model_and_optimizer_follow_the_recipe(tmp_path, synthetic_dir):
    objects = load_train_objs(recipe(tmp_path, synthetic_dir))
    clip = preprocessing_for(CLIP)
    assert clip.interpolation == "bicubic" and clip.mean != IMAGENET.mean
    for dataset in (objects.train_set, objects.query_set, objects.gallery_set):
        resize, *_, normalise = dataset.transform.transforms
        assert isinstance(normalise, NormalizeUint8) and (normalise.mean, normalise.std) == (clip.mean_255, clip.std_255)
        assert resize.interpolation == v2.InterpolationMode.BICUBIC
    blocks = objects.model.backbone.blocks
    assert len(blocks) == 10 and blocks[-1].drop_path1.drop_prob == pytest.approx(0.1)  # timm's rate, last block
    assert isinstance(objects.optimizer, torch.optim.AdamW)
    scales = sorted({group["lr_scale"] for group in objects.optimizer.param_groups})
    assert scales == pytest.approx([0.75**k for k in range(11, -1, -1)] + [10.0])  # stem, 10 blocks, top; head


@pytest.mark.slow
def test_a_clip_vit_trains_resumes_and_every_tool_embeds_as_training_did(tmp_path, synthetic_dir, capsys):
    out = tmp_path / "run"
    assert single_gpu.main(recipe(out, synthetic_dir)) == 0
    cfg = recipe(out, synthetic_dir, epochs=2)
    assert single_gpu.main(cfg) == 0  # resumes after epoch 1
    assert "resuming from snapshot" in capsys.readouterr().out
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records if "loss" in r] == [1, 2]
    last_eval = [r for r in records if "recall@1" in r][-1]
    snapshot = out / "snapshot.pt"
    assert read_snapshot(snapshot).preprocessing == preprocessing_for(CLIP).as_dict()

    assert evaluate.main([str(snapshot), "--out", str(tmp_path / "m.json")]) == 0
    report = json.loads((tmp_path / "m.json").read_text())
    assert report["recall@1"] == pytest.approx(last_eval["recall@1"], abs=1e-6)
    assert report["mAP@10"] == pytest.approx(last_eval["mAP@10"], abs=1e-6)

    # The tools' embedding of an image is the model's embedding of the training-time test transform.
    _, _, gallery = load_datasets(cfg)
    paths = [path for path, _ in gallery.samples[:4]]
    model = load_model(snapshot)
    with torch.no_grad():
        expected = torch.nn.functional.normalize(model.module(torch.stack([gallery[i][0] for i in range(4)])), dim=1)
    torch.testing.assert_close(search.embed_images(model, paths, torch.device("cpu")), expected)
    assert search.main([str(snapshot), "--query", paths[1], "--top_k", "3",  # the training gallery, embedded
                        "--num_workers", "0", "--json", str(tmp_path / "r.json")]) == 0
    (result,) = json.loads((tmp_path / "r.json").read_text())["results"]
    assert result["matches"][0]["path"] == paths[1]

    exported = tmp_path / "model.pt2"
    assert export.main([str(snapshot), "--exported", str(exported)]) == 0
    assert load_model(exported).preprocess == model.preprocess
    torch.testing.assert_close(load_retriever(exported, device="cpu").embed(paths), expected, rtol=1e-4, atol=1e-5)
    assert evaluate.main([str(exported), "--out", str(tmp_path / "e.json")]) == 0
    assert json.loads((tmp_path / "e.json").read_text())["recall@1"] == pytest.approx(last_eval["recall@1"], abs=1e-6)
