"""tools/embed.py: a catalog folder from a snapshot, on one process and two, resumed, with bad files."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import single_gpu
from arcface.inshop import InShop
from arcface.retrieval import extract_embeddings
from support.config import parse_config
from datautils import synthetic_root
from support.snapshot import read_snapshot, write_snapshot
from tools import embed
from tools.catalog import CatalogError, IndexMismatch, read_catalog
from tools.common import load_model, run_cli

ROOT = Path(__file__).resolve().parents[1]
QUIET = ["--num_workers", "0"]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> SimpleNamespace:
    """One smoke training run: its snapshot and synthetic In-Shop root (24 query, 24 gallery images)."""
    out = tmp_path_factory.mktemp("embed_run")
    cfg = parse_config(["1", "1", "--config", str(ROOT / "configs" / "smoke.toml"), "--out_dir", str(out),
                        "--synthetic_dir", str(out / "synthetic")])
    assert single_gpu.main(cfg) == 0
    return SimpleNamespace(snapshot=out / "snapshot.pt", root=synthetic_root(cfg))


def evaluation_embeddings(snapshot: Path, root: Path, split: str) -> torch.Tensor:
    """What tools/evaluate.py computes for a split (arcface.retrieval), L2-normalised."""
    model = load_model(snapshot)
    dataset = InShop(root, split, transform=model.preprocess.transform())
    return F.normalize(extract_embeddings(model.module, dataset, 7, torch.device("cpu")), dim=1)


def embed_main(*argv: str) -> int:
    return embed.main([*map(str, argv), *QUIET])


def test_a_split_embeds_as_evaluate_does_with_paths_and_meta_that_catalog_reads(run, tmp_path, capsys):
    out = tmp_path / "gallery"
    assert embed_main(run.snapshot, run.root, out, "--split", "gallery", "--shard_size", "5", "--batch_size", "3") == 0
    assert "24 of 24 images embedded (24 x 512 float32), 0 skipped" in capsys.readouterr().out
    catalog = read_catalog(out)  # tools/catalog.py's own checks: unit rows, counts, dtype
    expected = evaluation_embeddings(run.snapshot, run.root, "gallery")
    torch.testing.assert_close(torch.from_numpy(np.array(catalog.embeddings)), expected, rtol=1e-5, atol=1e-6)
    samples = InShop(run.root, "gallery").samples
    assert catalog.paths == [Path(path).relative_to(run.root).as_posix() for path, _ in samples]
    assert embed.catalog_paths(catalog) == [path for path, _ in samples]
    assert catalog.fingerprint == load_model(run.snapshot).fingerprint
    assert catalog.meta["images"] == str(run.root) and catalog.meta["split"] == "gallery"
    assert catalog.meta["preprocess"]["crop"] == 28 and catalog.meta["skipped"] == 0
    assert (out / embed.SKIPPED_FILE).read_text() == ""
    assert not (out / embed.SHARDS_DIR).exists()  # assembled, then removed
    # float16 halves the file; the rows stay unit vectors within its rounding.
    half = tmp_path / "half"
    assert embed_main(run.snapshot, run.root, half, "--split", "gallery", "--dtype", "float16") == 0
    rows = read_catalog(half).embeddings
    assert rows.dtype == np.float16 and rows.shape == (24, 512)
    assert (half / "embeddings.npy").stat().st_size < 0.51 * (out / "embeddings.npy").stat().st_size
    np.testing.assert_allclose(rows.astype(np.float32), expected.numpy(), atol=2e-3)


def test_all_images_of_an_inshop_root_and_items_for_search(run, tmp_path):
    out = tmp_path / "all"
    assert embed_main(run.snapshot, run.root, out) == 0
    catalog = read_catalog(out)
    listed = sorted(p.relative_to(run.root).as_posix() for p in (run.root / "Img").rglob("*.jpg"))
    assert catalog.paths == listed and catalog.meta["split"] is None
    items = embed.catalog_items(catalog)
    assert all(item is not None for item in items)
    gallery = InShop(run.root, "gallery")
    first = catalog.paths.index(Path(gallery.samples[0][0]).relative_to(run.root).as_posix())
    assert items[first] == gallery.item_ids[gallery.samples[0][1]]


@pytest.mark.slow
def test_two_processes_write_the_catalog_of_one(run, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    assert embed_main(run.snapshot, run.root, one, "--shard_size", "7") == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": ""}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "tools/embed.py",
         str(run.snapshot), str(run.root), str(two), "--shard_size", "7", "--batch_size", "4", *QUIET],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("96 of 96 images embedded") == 1  # rank 0 assembles and reports
    a, b = read_catalog(one), read_catalog(two)
    assert a.paths == b.paths
    np.testing.assert_allclose(b.embeddings, a.embeddings, rtol=1e-5, atol=1e-6)
    gallery = InShop(run.root, "gallery").samples
    gallery_rows = [a.paths.index(Path(path).relative_to(run.root).as_posix()) for path, _ in gallery]
    expected = evaluation_embeddings(run.snapshot, run.root, "gallery").numpy()
    np.testing.assert_allclose(np.asarray(b.embeddings)[gallery_rows], expected, rtol=1e-5, atol=1e-6)
    assert {k: v for k, v in b.meta.items() if k != "model"} == {k: v for k, v in a.meta.items() if k != "model"}


def test_a_stopped_job_continues_with_the_missing_shards(run, tmp_path, monkeypatch, capsys):
    out, written = tmp_path / "out", []
    write_shard = embed._write_shard

    def killed_after_two(*args, **kwargs):
        if len(written) == 2:
            raise KeyboardInterrupt  # as a preemption would stop it: two shards on disk
        written.append(args[1])
        write_shard(*args, **kwargs)

    monkeypatch.setattr(embed, "_write_shard", killed_after_two)
    with pytest.raises(KeyboardInterrupt):
        embed_main(run.snapshot, run.root, out, "--split", "gallery", "--shard_size", "5")
    assert sorted(p.name for p in (out / "shards").glob("*.npy")) == ["00000.npy", "00001.npy"]
    assert not (out / "meta.json").exists()
    written.clear()

    def recorded(*args, **kwargs):
        written.append(args[1])
        write_shard(*args, **kwargs)

    monkeypatch.setattr(embed, "_write_shard", recorded)
    capsys.readouterr()
    assert embed_main(run.snapshot, run.root, out, "--split", "gallery", "--shard_size", "5") == 0
    assert "2 of 5 shards already embedded; embedding the other 3" in capsys.readouterr().out
    assert written == [2, 3, 4]
    expected = evaluation_embeddings(run.snapshot, run.root, "gallery")
    torch.testing.assert_close(torch.from_numpy(np.array(read_catalog(out).embeddings)), expected,
                               rtol=1e-5, atol=1e-6)
    assert embed_main(run.snapshot, run.root, out, "--split", "gallery") == 0
    assert "already holds these embeddings (24 images); nothing to do" in capsys.readouterr().out


def bomb_jpeg(path: Path) -> None:
    """A small JPEG whose frame header claims 20000 x 20000 pixels."""
    Image.new("RGB", (16, 12), (90, 30, 200)).save(path, format="JPEG")
    data = bytearray(path.read_bytes())
    frame = data.index(b"\xff\xc0")
    data[frame + 5:frame + 9] = (20000).to_bytes(2, "big") * 2
    path.write_bytes(bytes(data))


def test_bad_files_are_skipped_listed_and_counted(run, tmp_path, capsys):
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    sources = [path for path, _ in InShop(run.root, "gallery").samples[:3]]
    for number, source in enumerate(sources):
        (folder / "sub" / f"good{number}.jpg").write_bytes(Path(source).read_bytes())
    (folder / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 cut short")
    (folder / "notes.png").write_text("not an image at all")
    bomb_jpeg(folder / "bomb.jpg")
    images = embed.list_catalog_images(folder)
    gone = folder / "gone.jpg"  # listed, then deleted before it was read: unreadable
    images = embed.CatalogImages(images.root, None, [*images.paths, str(gone)])
    meta = embed.embed_catalog(load_model(run.snapshot), images, tmp_path / "out", torch.device("cpu"),
                               shard_size=2, batch_size=2)
    assert meta["count"] == 3 and meta["skipped"] == 4 and meta["listed"] == 7
    assert "3 of 7 images embedded" in capsys.readouterr().out
    catalog = read_catalog(tmp_path / "out")
    assert catalog.paths == ["sub/good0.jpg", "sub/good1.jpg", "sub/good2.jpg"]
    reasons = dict(line.split("\t") for line in (tmp_path / "out" / "skipped.txt").read_text().splitlines())
    assert set(reasons) == {"bomb.jpg", "corrupt.jpg", "notes.png", "gone.jpg"}
    assert "claims 20000 x 20000" in reasons["bomb.jpg"]
    assert "cannot decode this image" in reasons["corrupt.jpg"] and "cannot decode this image" in reasons["notes.png"]
    assert "No such file" in reasons["gone.jpg"]


def test_a_folder_of_only_bad_files_says_so(run, tmp_path):
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "bad.jpg").write_bytes(b"nope")
    with pytest.raises(CatalogError, match="none of the 1 images could be embedded; the reasons are in"):
        embed_main(run.snapshot, tmp_path / "photos", tmp_path / "out")


def perturbed(run, path: Path) -> Path:
    snapshot = read_snapshot(run.snapshot)
    snapshot.model["backbone.conv1.weight"] = snapshot.model["backbone.conv1.weight"] + 0.05
    write_snapshot(snapshot, path)
    return path


def stopped_at_once(*args, **kwargs) -> None:
    raise KeyboardInterrupt


def test_an_out_of_another_model_images_or_settings_is_refused_in_one_line(run, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    assert embed_main(run.snapshot, run.root, out, "--split", "query") == 0
    other = perturbed(run, tmp_path / "other.pt")
    cases = [
        ([other, run.root, out, "--split", "query"], "made by another model (fingerprint"),
        ([run.snapshot, run.root, out, "--split", "gallery"], "made from other images"),
        ([run.snapshot, run.root, out, "--split", "query", "--dtype", "float16"],
         "made with other settings (dtype float32, now float16)"),
    ]
    for argv, message in cases:
        monkeypatch.setattr(sys, "argv", ["embed.py", *map(str, argv), *QUIET])
        capsys.readouterr()
        assert run_cli(embed.main) == 1
        err = capsys.readouterr().err
        assert err.startswith(f"error: {out}: {message}") and err.count("\n") == 1, err
        assert "write to another OUT folder, or delete this one" in err
    # Unfinished shards are refused the same way: their manifest names what they were made of.
    partial = tmp_path / "partial"
    monkeypatch.setattr(embed, "_write_shard", stopped_at_once)
    with pytest.raises(KeyboardInterrupt):
        embed_main(run.snapshot, run.root, partial, "--split", "query")
    monkeypatch.undo()
    with pytest.raises(IndexMismatch, match="made by another model"):
        embed_main(other, run.root, partial, "--split", "query")
    # A folder holding anything else is nobody's catalog: never written into.
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("precious")
    with pytest.raises(CatalogError, match="holds thesis.tex, which no catalog has"):
        embed_main(run.snapshot, run.root, tmp_path / "mine", "--split", "query")


def test_argument_errors(run, tmp_path, monkeypatch, capsys):
    with pytest.raises(ValueError, match="--split gallery needs an In-Shop root"):
        embed_main(run.snapshot, tmp_path, tmp_path / "out", "--split", "gallery")
    monkeypatch.setattr(sys, "argv", ["embed.py", str(run.snapshot), str(tmp_path / "nowhere"), str(tmp_path / "o")])
    assert run_cli(embed.main) == 1
    assert "nowhere: no such image, folder or In-Shop root" in capsys.readouterr().err
    for flags, message in ((["--shard_size", "0"], "--shard_size: expected an integer >= 1"),
                           (["--dtype", "int8"], "invalid choice: 'int8'")):
        monkeypatch.setattr(sys, "argv", ["embed.py", str(run.snapshot), str(run.root), str(tmp_path / "o"), *flags])
        with pytest.raises(SystemExit) as exit_status:
            embed.main(None)
        assert exit_status.value.code == 2 and message in capsys.readouterr().err
    # Flags between the positionals: MODEL keeps its place.
    args = embed.parse_args([str(run.snapshot), "--dtype", "float16", str(run.root), "out"])
    assert (args.model, args.images, args.out, args.dtype) == (str(run.snapshot), str(run.root), "out", "float16")
