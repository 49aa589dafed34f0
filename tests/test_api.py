"""tools.api: a trained model used from Python (embed images, search a gallery)."""

from pathlib import Path

import pytest
import torch

import single_gpu
from arcface.inshop import InShop
from support.config import parse_config
from datautils import synthetic_root
from support.snapshot import read_snapshot, write_snapshot
from tools import embed, export, search
from tools.api import Match, load_retriever
from tools.catalog import IndexMismatch
from tools.common import load_model

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("api")
    cfg = parse_config(["1", "1", "--config", str(ROOT / "configs" / "smoke.toml"), "--out_dir", str(out),
                        "--synthetic_dir", str(out / "synthetic")])
    assert single_gpu.main(cfg) == 0
    return out / "snapshot.pt", synthetic_root(cfg)


def test_embed_gives_the_tools_embeddings(trained):
    snapshot, root = trained
    paths = [path for path, _ in InShop(root, "gallery").samples[:6]]
    retriever = load_retriever(snapshot, device="cpu", batch_size=4)
    vectors = retriever.embed(paths)
    assert vectors.shape[0] == 6 and vectors.dtype == torch.float32
    torch.testing.assert_close(vectors.norm(dim=1), torch.ones(6))
    expected = search.embed_images(load_model(snapshot), paths, torch.device("cpu"), batch_size=3)
    torch.testing.assert_close(vectors, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(retriever.embed(paths[2]), vectors[2:3], rtol=1e-5, atol=1e-6)


def test_search_finds_the_query_itself_first_and_names_items(trained):
    snapshot, root = trained
    gallery = InShop(root, "gallery")
    query = gallery.samples[3][0]
    retriever = load_retriever(snapshot, device="cpu")
    results = retriever.search([query], root, k=4)  # an In-Shop root: its gallery split
    assert len(results) == 1 and [m.rank for m in results[0]] == [1, 2, 3, 4]
    best = results[0][0]
    assert isinstance(best, Match) and best.path == query and best.score == pytest.approx(1.0, abs=1e-5)
    assert best.item == gallery.item_ids[gallery.samples[3][1]]
    scores = [m.score for m in results[0]]
    assert scores == sorted(scores, reverse=True)
    folder = Path(query).parent
    in_folder = retriever.search(query, folder, k=50)[0]  # a folder: every image below it
    assert len(in_folder) == len(list(folder.glob("*.jpg"))) and in_folder[0].item is None


def test_search_a_catalog_folder_of_embed(trained, tmp_path):
    snapshot, root = trained
    out = tmp_path / "catalog"
    assert embed.main([str(snapshot), str(root), str(out), "--split", "gallery", "--num_workers", "0"]) == 0
    gallery = InShop(root, "gallery")
    queries = [gallery.samples[3][0], gallery.samples[10][0]]
    retriever = load_retriever(snapshot, device="cpu")
    from_catalog = retriever.search(queries, index=out, k=4)
    from_gallery = retriever.search(queries, root, k=4)  # the same images, embedded here
    assert [[m.path for m in row] for row in from_catalog] == [[m.path for m in row] for row in from_gallery]
    for row, from_images in zip(from_catalog, from_gallery):
        assert [m.score for m in row] == pytest.approx([m.score for m in from_images], abs=1e-5)
    best = from_catalog[0][0]
    assert best.path == queries[0] and best.item == gallery.item_ids[gallery.samples[3][1]]
    # A catalog of another model's embeddings is refused; gallery and index are one or the other.
    other = read_snapshot(snapshot)
    other.model["backbone.conv1.weight"] += 0.05
    write_snapshot(other, tmp_path / "other.pt")
    with pytest.raises(IndexMismatch, match="embeddings of another model"):
        load_retriever(tmp_path / "other.pt", device="cpu").search(queries, index=out)
    with pytest.raises(ValueError, match="one of the two"):
        retriever.search(queries, root, index=out)
    with pytest.raises(ValueError, match="one of the two"):
        retriever.search(queries)


def test_an_export_embeds_like_its_snapshot(trained, tmp_path):
    snapshot, root = trained
    assert export.main([str(snapshot), "--torchscript", str(tmp_path / "model.torchscript.pt")]) == 0
    paths = [path for path, _ in InShop(root, "query").samples[:3]]
    from_snapshot = load_retriever(snapshot, device="cpu").embed(paths)
    from_export = load_retriever(tmp_path / "model.torchscript.pt", device="cpu").embed(paths)
    torch.testing.assert_close(from_export, from_snapshot, rtol=1e-4, atol=1e-5)


def test_bad_arguments_name_what_is_wrong(trained, tmp_path):
    snapshot, _ = trained
    retriever = load_retriever(snapshot, device="cpu")
    with pytest.raises(ValueError, match="at least one image"):
        retriever.embed([])
    with pytest.raises(FileNotFoundError, match="nope.jpg: no such image file"):
        retriever.embed([tmp_path / "nope.jpg"])
    with pytest.raises(ValueError, match="k: expected an integer >= 1"):
        retriever.search(tmp_path, tmp_path, k=0)
