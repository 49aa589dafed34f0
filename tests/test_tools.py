"""The retrieval tools (tools/) end to end on one smoke training run."""

import dataclasses
import importlib.util
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import single_gpu
from arcface.inshop import InShop
from arcface.transforms import Preprocessing, load_image, test_transform
from support.config import Config, dump_toml, from_plain, parse_config, to_plain
from datautils import synthetic_root
from tools import embed, evaluate, export, search, visualize
from tools.api import load_retriever
from tools import catalog
from tools.catalog import CatalogError, read_catalog
from tools.common import IndexMismatch, Preprocess, fingerprint, load_model, preprocess_of, run_cli
from support.snapshot import SNAPSHOT_VERSION, Snapshot, SnapshotError, read_snapshot, write_snapshot

ROOT = Path(__file__).resolve().parents[1]
QUIET = ["--num_workers", "0"]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> SimpleNamespace:
    """One smoke training run: its snapshot, metrics.jsonl records and synthetic In-Shop root."""
    out = tmp_path_factory.mktemp("run")
    cfg = parse_config(["1", "1", "--config", str(ROOT / "configs" / "smoke.toml"), "--out_dir", str(out),
                        "--synthetic_dir", str(out / "synthetic")])
    assert single_gpu.main(cfg) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    last_eval = [record for record in records if "recall@1" in record][-1]
    snapshot = read_snapshot(out / "snapshot.pt")
    return SimpleNamespace(snapshot=out / "snapshot.pt", last_eval=last_eval, root=synthetic_root(cfg),
                           num_classes=snapshot.num_classes, out=out)


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def same_metrics(report: dict, expected: dict, keys=("recall@1", "recall@5", "mAP@10")) -> None:
    for key in keys:
        assert report[key] == pytest.approx(expected[key], abs=1e-6), key


# ------------------------------------------------------------------------------------------
# evaluate


def test_evaluate_equals_the_trainers_last_evaluation(run, tmp_path):
    assert evaluate.main([str(run.snapshot), "--out", str(tmp_path / "m.json")]) == 0
    report = read_json(tmp_path / "m.json")
    same_metrics(report, run.last_eval)
    assert Path(report["data_root"]) == run.root  # the data the snapshot was trained on
    assert report["num_queries"] == len(InShop(run.root, "query"))


def test_evaluate_under_torchrun_equals_one_process(run, tmp_path):
    flags = ["--recall_at", "1", "2", "4", "--map_at", "3", "10", "--batch_size", "5"]
    assert evaluate.main([str(run.snapshot), *flags, "--out", str(tmp_path / "one.json")]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": ""}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "tools/evaluate.py", str(run.snapshot), *flags, *QUIET, "--out", str(tmp_path / "two.json")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = read_json(tmp_path / "one.json"), read_json(tmp_path / "two.json")
    assert two["num_queries"] == one["num_queries"] and two["num_gallery"] == one["num_gallery"]
    same_metrics(two, one, keys=("recall@1", "recall@2", "recall@4", "mAP@3", "mAP@10"))


def test_evaluate_through_a_flat_index_equals_exact_evaluation(run, tmp_path, capsys):
    pytest.importorskip("faiss", reason="faiss-cpu is an optional extra")
    assert evaluate.main([str(run.snapshot), "--out", str(tmp_path / "exact.json")]) == 0
    assert evaluate.main([str(run.snapshot), "--index", "flat", "--out", str(tmp_path / "flat.json")]) == 0
    assert "through a flat index" in capsys.readouterr().out
    exact, flat = read_json(tmp_path / "exact.json"), read_json(tmp_path / "flat.json")
    assert flat.pop("index") == {"kind": "flat", "params": {}}
    assert flat == exact  # the same ranking, so the same numbers to the last bit


def labelled_embeddings(labels: int, queries: int, gallery: int, dim: int = 32, seed: int = 0):
    """Unit rows around one random centre per label; every label has a gallery row."""
    generator = torch.Generator().manual_seed(seed)
    centres = torch.nn.functional.normalize(torch.randn(labels, dim, generator=generator), dim=1)
    gallery_labels = torch.cat([torch.arange(labels), torch.randint(labels, (gallery - labels,), generator=generator)])
    query_labels = torch.randint(labels, (queries,), generator=generator)

    def rows(of: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.normalize(centres[of] + 0.2 * torch.randn(len(of), dim, generator=generator), dim=1)

    return rows(query_labels), rows(gallery_labels), query_labels, gallery_labels


def test_index_metrics_flat_equals_retrieval_metrics_and_hnsw_is_close():
    pytest.importorskip("faiss", reason="faiss-cpu is an optional extra")
    from arcface.metrics import retrieval_metrics

    query, gallery, query_labels, gallery_labels = labelled_embeddings(150, 700, 900)
    settings = {"recall_at": (1, 5), "map_at": (10,)}
    exact = retrieval_metrics(query, gallery, query_labels, gallery_labels, **settings)
    flat = evaluate.index_metrics(query, gallery, query_labels, gallery_labels, "flat", **settings)
    assert flat.pop("index")["kind"] == "flat" and flat == exact
    assert 20 < exact["recall@1"] < 95  # a set where the ranking matters
    hnsw = evaluate.index_metrics(query, gallery, query_labels, gallery_labels, "hnsw", **settings)
    assert hnsw.pop("index")["params"]["ef_search"] == catalog.HNSW_EF_SEARCH
    for key in ("recall@1", "recall@5", "mAP@10"):
        assert abs(hnsw[key] - exact[key]) <= 0.5, key
    # K above the gallery size, as retrieval_metrics allows.
    small = evaluate.index_metrics(query[:20], gallery[:150], query_labels[:20], gallery_labels[:150], "flat",
                                   recall_at=(1, 200), map_at=(300,))
    small.pop("index")
    assert small == retrieval_metrics(query[:20], gallery[:150], query_labels[:20], gallery_labels[:150],
                                      recall_at=(1, 200), map_at=(300,))


def test_places_an_index_left_empty_count_as_misses():
    from arcface.metrics import ranking_metrics

    query_labels, gallery_labels = torch.tensor([0, 1]), torch.tensor([0, 1, 1, 0])
    full = torch.tensor([[0, 3, 1], [1, 2, 0]])
    holed = torch.tensor([[0, -1, -1], [-1, 1, 2]])  # query 1: its first place empty
    ranked, labels = evaluate._missing_as_misses(holed, query_labels, gallery_labels, 3)
    metrics = ranking_metrics(ranked, query_labels, labels, recall_at=(1, 3), map_at=(3,))
    assert metrics["recall@1"] == 50.0 and metrics["recall@3"] == 100.0
    assert metrics["mAP@3"] == pytest.approx(100 * (1 / 2 + (1 / 2 + 2 / 3) / 2) / 2)
    assert ranking_metrics(full, query_labels, gallery_labels, recall_at=(1,), map_at=(3,))["recall@1"] == 100.0


def test_mmpretrain_argument_errors(run):
    with pytest.raises(ValueError, match="--arch"):
        evaluate.main(["--mmpretrain", str(run.snapshot), "--num_classes", "3"])
    with pytest.raises(ValueError, match="MODEL file"):
        evaluate.main([])


# ------------------------------------------------------------------------------------------
# re-ranking (arcface/rerank.py)


def test_evaluate_rerank_none_is_the_plain_evaluation_bit_for_bit(run, tmp_path):
    assert evaluate.main([str(run.snapshot), "--out", str(tmp_path / "plain.json")]) == 0
    assert evaluate.main([str(run.snapshot), "--rerank", "none", "--qe_k", "7",  # parameters of no method
                          "--out", str(tmp_path / "none.json")]) == 0
    assert (tmp_path / "none.json").read_text() == (tmp_path / "plain.json").read_text()
    assert "rerank" not in read_json(tmp_path / "none.json")


def test_evaluate_rerank_qe_under_torchrun_equals_one_process(run, tmp_path):
    flags = ["--rerank", "qe", "--qe_k", "2", "--qe_alpha", "3", "--recall_at", "1", "2", "4",
             "--map_at", "3", "10", "--batch_size", "5"]
    assert evaluate.main([str(run.snapshot), *flags, "--out", str(tmp_path / "one.json")]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": ""}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "tools/evaluate.py", str(run.snapshot), *flags, *QUIET, "--out", str(tmp_path / "two.json")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "re-ranked: qe (qe_k 2, qe_alpha 3.0)" in proc.stdout
    one, two = read_json(tmp_path / "one.json"), read_json(tmp_path / "two.json")
    assert one["rerank"] == two["rerank"] == {"method": "qe", "qe_k": 2, "qe_alpha": 3.0}
    assert two["num_queries"] == one["num_queries"] and two["num_gallery"] == one["num_gallery"]
    same_metrics(two, one, keys=("recall@1", "recall@2", "recall@4", "mAP@3", "mAP@10"))


def test_evaluate_rerank_kr_reports_its_settings_and_lambda_one_is_plain(run, tmp_path, capsys):
    assert evaluate.main([str(run.snapshot), "--rerank", "kr", "--kr_k1", "5", "--kr_k2", "2",
                          "--out", str(tmp_path / "kr.json")]) == 0
    assert "re-ranked: kr (kr_k1 5, kr_k2 2, kr_lambda 0.3)" in capsys.readouterr().out
    assert read_json(tmp_path / "kr.json")["rerank"] == {"method": "kr", "kr_k1": 5, "kr_k2": 2, "kr_lambda": 0.3}
    assert evaluate.main([str(run.snapshot), "--rerank", "kr", "--kr_lambda", "1",
                          "--out", str(tmp_path / "one.json")]) == 0
    plain = {key: value for key, value in read_json(tmp_path / "one.json").items() if key != "rerank"}
    assert evaluate.main([str(run.snapshot), "--out", str(tmp_path / "plain.json")]) == 0
    assert plain == read_json(tmp_path / "plain.json")  # lambda = 1: the cosine ranking, bit for bit


def gallery_catalog(run, out: Path) -> Path:
    """The gallery split embedded by tools/embed.py into `out`."""
    assert embed.main([str(run.snapshot), str(run.root), str(out), "--split", "gallery", *QUIET]) == 0
    return out


def test_search_rerank_ranks_the_catalog_and_says_how(run, tmp_path, capsys):
    out = gallery_catalog(run, tmp_path / "catalog")
    flags = ["--query", str(run.root), "--max_queries", "4", "--index", str(out), "--top_k", "3", *QUIET]
    assert search.main([str(run.snapshot), *flags, "--json", str(tmp_path / "plain.json")]) == 0
    assert search.main([str(run.snapshot), *flags, "--rerank", "none", "--json", str(tmp_path / "none.json")]) == 0
    assert (tmp_path / "none.json").read_text() == (tmp_path / "plain.json").read_text()
    paths = embed.catalog_paths(read_catalog(out))
    for method in ("qe", "kr"):
        capsys.readouterr()
        assert search.main([str(run.snapshot), *flags, "--rerank", method, "--json", str(tmp_path / "r.json")]) == 0
        assert f"re-ranked: method {method}" in capsys.readouterr().out
        report = read_json(tmp_path / "r.json")
        assert report["rerank"]["method"] == method and len(report["results"]) == 4
        for result in report["results"]:
            matches = result["matches"]
            assert [m["rank"] for m in matches] == [1, 2, 3]
            assert all(a["score"] >= b["score"] for a, b in zip(matches, matches[1:]))
            assert all(m["path"] in paths for m in matches)


@pytest.mark.parametrize("flags, message", [
    (["--qe_k", "0"], "--qe_k must be an integer >= 1, got 0"),
    (["--qe_alpha", "-1"], "--qe_alpha must be >= 0, got -1.0"),
    (["--kr_lambda", "2"], r"--kr_lambda must lie in [0, 1], got 2.0"),
    (["--rerank", "dba"], "invalid choice: 'dba'"),
])
def test_rerank_flag_errors_end_with_usage(tmp_path, monkeypatch, capsys, flags, message):
    for tool, argv in ((search, ["snapshot.pt", "--query", str(tmp_path)]), (evaluate, ["snapshot.pt"])):
        monkeypatch.setattr(sys, "argv", [tool.__file__, *argv, *flags])
        with pytest.raises(SystemExit) as exit_status:
            tool.main(None)
        assert exit_status.value.code == 2
        assert message in capsys.readouterr().err


def test_evaluate_index_and_rerank_exclude_each_other(monkeypatch, capsys):
    for flags, message in ((["--index", "hnsw", "--rerank", "qe"], "--index and --rerank"),
                           (["--index", "annoy"], "invalid choice: 'annoy'")):
        monkeypatch.setattr(sys, "argv", [evaluate.__file__, "snapshot.pt", *flags])
        with pytest.raises(SystemExit) as exit_status:
            evaluate.main(None)
        assert exit_status.value.code == 2 and message in capsys.readouterr().err


# ------------------------------------------------------------------------------------------
# mmpretrain checkpoints


def mmpretrain_checkpoint(snapshot_path: Path, path: Path, retriever_layout: bool) -> Path:
    """The snapshot's weights under mmpretrain's key names (classifier or retriever layout)."""
    state = {}
    for key, tensor in read_snapshot(snapshot_path).model.items():
        if key == "head.weight":
            key = "head.norm_product.weight"
        elif retriever_layout and key.startswith("backbone."):
            key = "image_encoder.0." + key.removeprefix("backbone.")
        state[key] = tensor
    state["data_preprocessor.mean"] = torch.tensor([123.675, 116.28, 103.53]).view(3, 1, 1)
    torch.save({"meta": {"mmpretrain_version": "1.2.0"}, "state_dict": state}, path)
    return path


@pytest.mark.parametrize("retriever_layout", [False, True], ids=["classifier", "retriever"])
def test_mmpretrain_checkpoint_evaluates_like_the_snapshot(run, tmp_path, retriever_layout):
    checkpoint = mmpretrain_checkpoint(run.snapshot, tmp_path / "arcface.pth", retriever_layout)
    model_flags = ["--mmpretrain", str(checkpoint), "--arch", "resnet18", "--num_classes", str(run.num_classes),
                   "--resize", "32", "--crop", "28"]
    assert evaluate.main([*model_flags, "--data_root", str(run.root), "--recall_at", "1", "5",
                          "--batch_size", "32", *QUIET, "--out", str(tmp_path / "m.json")]) == 0
    same_metrics(read_json(tmp_path / "m.json"), run.last_eval)
    with pytest.raises(ValueError, match="shape"):  # two sub-centers per class: a head twice as tall
        evaluate.main([*model_flags, "--sub_centers", "2", "--data_root", str(run.root)])


def test_mmpretrain_checkpoint_searches(run, tmp_path):
    checkpoint = mmpretrain_checkpoint(run.snapshot, tmp_path / "arcface.pth", retriever_layout=False)
    image = InShop(run.root, "gallery").samples[3][0]
    assert search.main(["--mmpretrain", str(checkpoint), "--arch", "resnet18", "--num_classes",
                        str(run.num_classes), "--resize", "32", "--crop", "28", "--gallery", str(run.root),
                        "--query", image, *QUIET, "--json", str(tmp_path / "r.json")]) == 0
    assert (tmp_path / "arcface.catalog" / "meta.json").exists()  # default catalog: next to the checkpoint
    assert read_json(tmp_path / "r.json")["results"][0]["matches"][0]["path"] == image


# ------------------------------------------------------------------------------------------
# search


def embedding_of(model, path: str) -> torch.Tensor:
    image = test_transform(model.preprocess.resize, model.preprocess.crop)(load_image(path))
    with torch.no_grad():
        return model.module(image[None])[0].double()


def test_search_finds_a_gallery_image_first_with_cosine_scores(run, tmp_path):
    gallery = InShop(run.root, "gallery")
    image = gallery.samples[5][0]
    assert search.main([str(run.snapshot), "--query", image, "--top_k", "4", *QUIET,
                        "--json", str(tmp_path / "r.json")]) == 0
    (result,) = read_json(tmp_path / "r.json")["results"]
    matches = result["matches"]
    assert matches[0]["path"] == image and matches[0]["score"] == pytest.approx(1.0, abs=1e-5)
    assert [m["rank"] for m in matches] == [1, 2, 3, 4]
    assert all(a["score"] >= b["score"] for a, b in zip(matches, matches[1:]))
    # Scores are cosine similarities: recompute one in float64 from the model itself.
    model = load_model(run.snapshot)
    query, other = embedding_of(model, image), embedding_of(model, matches[2]["path"])
    cosine = torch.nn.functional.cosine_similarity(query, other, dim=0).item()
    assert matches[2]["score"] == pytest.approx(cosine, abs=1e-5)
    # Gallery items come from the partition file.
    item_of = {path: gallery.item_ids[label] for path, label in gallery.samples}
    assert all(m["item"] == item_of[m["path"]] for m in matches)


def test_search_inshop_queries_know_their_items(run, tmp_path, capsys):
    assert search.main([str(run.snapshot), "--query", str(run.root), "--max_queries", "3", *QUIET,
                        "--json", str(tmp_path / "r.json")]) == 0
    results = read_json(tmp_path / "r.json")["results"]
    query_set = InShop(run.root, "query")
    item_of = {path: query_set.item_ids[label] for path, label in query_set.samples}
    assert len(results) == 3 and len({r["query"] for r in results}) == 3
    assert all(r["item"] == item_of[r["query"]] for r in results)
    assert "query 3/3" in capsys.readouterr().out


def perturbed_snapshot(run, path: Path, key: str) -> Path:
    snapshot = read_snapshot(run.snapshot)
    snapshot.model[key] = snapshot.model[key] + 0.05
    write_snapshot(snapshot, path)
    return path


def test_the_default_catalog_is_reused_until_the_model_changes(run, tmp_path, capsys):
    model = tmp_path / "model.pt"  # its default catalog: tmp_path/model.catalog/
    catalog = tmp_path / "model.catalog"
    query = InShop(run.root, "gallery").samples[0][0]

    def search_with(source: Path, *flags: str) -> str:
        model.write_bytes(source.read_bytes())
        search.main([str(model), "--query", query, *QUIET, *flags])
        return capsys.readouterr().out

    assert "catalog of 24 images written to" in search_with(run.snapshot)
    built = os.stat(catalog / "embeddings.npy").st_mtime_ns
    assert "using the catalog" in search_with(run.snapshot)
    assert os.stat(catalog / "embeddings.npy").st_mtime_ns == built
    # The ArcFace head plays no part in embeddings: changing it keeps the catalog.
    head_changed = perturbed_snapshot(run, tmp_path / "head.pt", "head.weight")
    assert "using the catalog" in search_with(head_changed)
    # Other backbone weights: refused with --no_rebuild, rebuilt otherwise.
    retrained = perturbed_snapshot(run, tmp_path / "retrained.pt", "backbone.conv1.weight")
    old, new = load_model(run.snapshot).fingerprint, load_model(retrained).fingerprint
    assert old != new
    with pytest.raises(IndexMismatch, match=f"another model.*{old}.*{new}"):
        search_with(retrained, "--no_rebuild")
    rebuilt = search_with(retrained)
    assert "made by another model" in rebuilt and "rebuilding it" in rebuilt
    assert read_catalog(catalog).fingerprint == new


def test_a_catalog_of_another_model_is_refused_in_one_line(run, tmp_path, monkeypatch, capsys):
    out = gallery_catalog(run, tmp_path / "catalog")
    retrained = perturbed_snapshot(run, tmp_path / "retrained.pt", "backbone.conv1.weight")
    query = InShop(run.root, "query").samples[0][0]
    monkeypatch.setattr(sys, "argv", ["search.py", str(retrained), "--query", query, "--index", str(out), *QUIET])
    capsys.readouterr()
    assert run_cli(search.main) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {out}: embeddings of another model (fingerprint ") and err.count("\n") == 1
    # Another dimension: a catalog whose rows are not this model's size.
    meta = json.loads((out / "meta.json").read_text())
    np.save(out / "embeddings.npy", np.eye(8, dtype=np.float32)[np.arange(24) % 8])
    (out / "meta.json").write_text(json.dumps({**meta, "dim": 8}))
    with pytest.raises(IndexMismatch, match="embeddings of dimension 8, this model's have 512"):
        search.main([str(run.snapshot), "--query", query, "--index", str(out), *QUIET])


def test_search_through_the_catalogs_faiss_index(run, tmp_path):
    pytest.importorskip("faiss", reason="faiss-cpu is an optional extra")
    from tools import index as index_cli

    out = gallery_catalog(run, tmp_path / "catalog")
    flags = ["--query", str(run.root), "--max_queries", "5", "--index", str(out), "--top_k", "4", *QUIET]
    assert search.main([str(run.snapshot), *flags, "--json", str(tmp_path / "exact.json")]) == 0
    assert index_cli.main([str(out), "--kind", "flat", "--sample", "0"]) == 0
    assert search.main([str(run.snapshot), *flags, "--json", str(tmp_path / "flat.json")]) == 0
    exact, flat = read_json(tmp_path / "exact.json"), read_json(tmp_path / "flat.json")
    assert (exact["searched"], flat["searched"]) == ("exact", "flat")
    for a, b in zip(exact["results"], flat["results"]):
        assert [m["path"] for m in a["matches"]] == [m["path"] for m in b["matches"]]
        assert [m["score"] for m in a["matches"]] == pytest.approx([m["score"] for m in b["matches"]], abs=1e-5)


def test_folder_gallery_is_searched_recursively_and_rebuilt_when_it_changes(run, tmp_path, capsys):
    folder = tmp_path / "photos"
    sources = [path for path, _ in InShop(run.root, "gallery").samples[:4]]
    for number, source in enumerate(sources):
        target = folder / f"level{number % 2}" / "deeper" / f"photo{number}.jpg"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(Path(source).read_bytes())
    model = tmp_path / "model.pt"
    model.symlink_to(run.snapshot)
    flags = ["--gallery", str(folder), "--top_k", "2", *QUIET]
    assert search.main([str(model), "--query", str(folder), *flags, "--json", str(tmp_path / "r.json")]) == 0
    results = read_json(tmp_path / "r.json")["results"]
    assert len(results) == 4
    for result in results:  # every photo finds itself first; a plain folder has no item ids
        assert result["matches"][0]["path"] == result["query"]
        assert result["item"] is None and result["matches"][0]["item"] is None
    capsys.readouterr()
    extra = folder / "new.png"
    Image.open(sources[0]).save(extra)
    search.main([str(model), "--query", str(extra), *flags])
    assert "the image list changed (4 images then, 5 now): rebuilding it" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------
# errors


def test_missing_and_foreign_model_files_are_named(run, tmp_path):
    missing = tmp_path / "nope" / "snapshot.pt"
    with pytest.raises(FileNotFoundError, match=f"{missing}: no such model file"):
        evaluate.main([str(missing)])
    text_file = tmp_path / "notes.pt"
    text_file.write_text("not a checkpoint")
    with pytest.raises(SnapshotError, match=f"{text_file}: cannot be read as a snapshot"):
        evaluate.main([str(text_file)])
    state_dict = tmp_path / "weights.pth"
    torch.save({"state_dict": {"backbone.conv1.weight": torch.zeros(1)}}, state_dict)
    with pytest.raises(SnapshotError, match="not a snapshot.*--mmpretrain"):
        search.main([str(state_dict), "--query", str(tmp_path)])


def test_data_root_without_partition_file(run, tmp_path):
    with pytest.raises(FileNotFoundError, match="list_eval_partition.txt"):
        evaluate.main([str(run.snapshot), "--data_root", str(tmp_path)])


def test_empty_folder_and_corrupt_image(run, tmp_path):
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "sub" / "notes.txt").write_text("no images here")
    with pytest.raises(ValueError, match=f"{empty}: no images"):
        search.main([str(run.snapshot), "--gallery", str(empty), "--query", str(empty), *QUIET])
    broken = tmp_path / "broken"
    broken.mkdir()
    good = broken / "good.jpg"
    good.write_bytes(Path(InShop(run.root, "gallery").samples[0][0]).read_bytes())
    (broken / "bad.jpg").write_bytes(b"\xff\xd8 this is not a JPEG")
    model = tmp_path / "model.pt"
    model.symlink_to(run.snapshot)
    # A bad gallery image is skipped (and listed); a bad query stops the search, naming it.
    assert search.main([str(model), "--gallery", str(broken), "--query", str(good), *QUIET]) == 0
    assert (tmp_path / "model.catalog" / "skipped.txt").read_text().startswith("bad.jpg\t")
    with pytest.raises(OSError, match="bad.jpg"):
        search.main([str(model), "--gallery", str(broken), "--query", str(broken), *QUIET])


def test_an_index_that_is_not_a_catalog_folder(run, tmp_path, monkeypatch, capsys):
    index = tmp_path / "g.idx"
    torch.save({"embeddings": torch.zeros(2, 3)}, index)
    with pytest.raises(CatalogError, match=f"{index}: no such catalog folder"):
        search.main([str(run.snapshot), "--query", str(run.root), "--index", str(index), *QUIET])
    monkeypatch.setattr(sys, "argv", ["search.py", str(run.snapshot), "--query", "q.jpg", "--index", "OUT",
                                      "--gallery", "photos"])
    with pytest.raises(SystemExit) as exit_status:
        search.main(None)
    assert exit_status.value.code == 2 and "not both" in capsys.readouterr().err


def test_command_line_errors_are_one_line_and_exit_nonzero(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["evaluate.py", str(tmp_path / "missing.pt")])
    assert run_cli(evaluate.main) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "missing.pt" in err and err.count("\n") == 1


# ------------------------------------------------------------------------------------------
# visualize


def solid_image(path: Path, colour: tuple[int, int, int]) -> str:
    Image.new("RGB", (20, 30), colour).save(path)  # not square: padded into the thumbnail
    return str(path)


def test_result_grid_layout_scores_and_border_colours(tmp_path):
    red, blue, yellow, cyan = (250, 0, 0), (0, 0, 250), (250, 250, 0), (0, 250, 250)
    files = {name: solid_image(tmp_path / f"{name}.png", colour)
             for name, colour in [("red", red), ("blue", blue), ("yellow", yellow), ("cyan", cyan)]}
    results = [
        {"query": files["red"], "item": "a", "matches": [
            {"path": files["blue"], "score": 0.91, "item": "a"},
            {"path": files["yellow"], "score": 0.52, "item": "b"},
            {"path": files["cyan"], "score": 0.13, "item": None}]},
        {"query": files["cyan"], "item": None, "matches": [
            {"path": files["red"], "score": 0.7, "item": "a"}]},
    ]
    (tmp_path / "r.json").write_text(json.dumps({"results": results}))
    thumb = 40
    assert visualize.main(["grid", str(tmp_path / "r.json"), "--out", str(tmp_path / "g.png"),
                           "--thumb", str(thumb)]) == 0
    grid = Image.open(tmp_path / "g.png").convert("RGB")
    cell = thumb + 2 * visualize.BORDER
    cells_width, cells_height = visualize.grid_size(2, 4, thumb)
    assert (cells_width, cells_height) == (
        2 * visualize.MARGIN + 4 * cell + 3 * visualize.GAP + visualize.QUERY_GAP,
        2 * visualize.MARGIN + 2 * (cell + visualize.CAPTION) + visualize.GAP)
    assert grid.size[0] == cells_width and grid.size[1] > cells_height  # the legend is below
    expected = {  # (row, column): (border, centre of the thumbnail)
        (0, 0): (visualize.QUERY_COLOUR, red), (0, 1): (visualize.SAME_ITEM_COLOUR, blue),
        (0, 2): (visualize.OTHER_ITEM_COLOUR, yellow), (0, 3): (visualize.UNKNOWN_COLOUR, cyan),
        (1, 0): (visualize.QUERY_COLOUR, cyan), (1, 1): (visualize.UNKNOWN_COLOUR, red),
    }
    for (row, column), (border, centre) in expected.items():
        x, y = visualize.cell_origin(row, column, thumb)
        assert grid.getpixel((x + 1, y + cell // 2)) == border, (row, column)
        assert grid.getpixel((x + cell // 2, y + cell // 2)) == centre, (row, column)
        for line in range(2):  # rank and score (or "query N"), then the item id or file name
            top = y + cell + 2 + line * visualize.LINE
            caption = grid.crop((x, top, x + cell, top + visualize.LINE))
            assert caption.convert("L").getextrema()[0] < 128, (row, column, line)
    x, y = visualize.cell_origin(1, 2, thumb)  # the second query has one match: empty cell
    assert grid.getpixel((x + cell // 2, y + cell // 2)) == visualize.BACKGROUND


def test_grid_captions_say_rank_score_and_item_and_a_legend_explains_the_borders(tmp_path):
    result = {"query": "/q/photo.jpg", "item": "id_00000002", "matches": [
        {"rank": 1, "path": "/g/01_1_front.jpg", "score": 0.98765, "item": "id_00000002"},
        {"rank": 2, "path": "/g/other.jpg", "score": 0.5, "item": None}]}
    assert visualize.query_caption(3, result) == ("query 3", "id_00000002")
    assert visualize.match_caption(1, result["matches"][0]) == ("#1  0.988", "id_00000002")
    assert visualize.match_caption(2, result["matches"][1]) == ("#2  0.500", "other.jpg")  # no item: file name
    image = solid_image(tmp_path / "a.png", (250, 250, 0))
    grid = visualize.result_grid([{"query": image, "item": "x", "matches": [
        {"rank": 1, "path": image, "score": 0.9, "item": "x"}]}], thumb=16)
    _, cells_height = visualize.grid_size(1, 2, 16)
    legend = grid.crop((0, cells_height - visualize.MARGIN, grid.size[0], grid.size[1]))
    colours = {colour for _, colour in legend.getcolors(maxcolors=100_000)}
    for colour, meaning in visualize.LEGEND:  # every border colour has its swatch, even in a narrow grid
        assert colour in colours, meaning
    meanings = [meaning for colour, meaning in visualize.LEGEND]
    assert meanings == ["query", "same item as the query", "another item", "item not known"]
    font = visualize.ImageFont.load_default()
    short = visualize.fit_text("img_0000000021234567890.jpg", font, 60)  # too long for a small cell
    assert font.getlength(short) <= 60 and ".." in short and short.endswith(".jpg")


def test_grid_names_a_missing_image(tmp_path):
    results = {"results": [{"query": str(tmp_path / "gone.jpg"), "matches": [{"path": "x.jpg", "score": 1.0}]}]}
    (tmp_path / "r.json").write_text(json.dumps(results))
    with pytest.raises(FileNotFoundError, match="gone.jpg"):
        visualize.main(["grid", str(tmp_path / "r.json"), "--out", str(tmp_path / "g.png")])
    assert not (tmp_path / "g.png").exists()


def bomb_jpeg(path: Path) -> str:
    """A small JPEG whose frame header claims 20000 x 20000 pixels."""
    Image.new("RGB", (16, 12), (90, 30, 200)).save(path, format="JPEG")
    data = bytearray(path.read_bytes())
    frame = data.index(b"\xff\xc0")
    data[frame + 5:frame + 9] = (20000).to_bytes(2, "big") * 2
    path.write_bytes(bytes(data))
    return str(path)


def test_grid_and_search_refuse_an_image_claiming_too_many_pixels(tmp_path, monkeypatch, capsys):
    from tools.common import ImageFiles

    bomb, fine = bomb_jpeg(tmp_path / "bomb.jpg"), solid_image(tmp_path / "fine.png", (1, 2, 3))
    results = {"results": [{"query": fine, "matches": [{"path": bomb, "score": 1.0}]}]}
    (tmp_path / "r.json").write_text(json.dumps(results))
    with pytest.raises(OSError, match=r"bomb\.jpg: the JPEG header claims 20000 x 20000"):
        visualize.main(["grid", str(tmp_path / "r.json"), "--out", str(tmp_path / "g.png")])
    assert not (tmp_path / "g.png").exists()
    with pytest.raises(OSError, match=r"fine\.png: the PNG header claims 20 x 30 = 600 pixels, more than the limit of 599"):
        visualize.main(["grid", str(tmp_path / "r.json"), "--out", str(tmp_path / "g.png"),
                        "--max_image_pixels", "599"])
    with pytest.raises(OSError, match="bomb.jpg"):
        ImageFiles([bomb], test_transform(8, 8))[0]
    with pytest.raises(OSError, match="limit of 599"):
        ImageFiles([fine], test_transform(8, 8), max_pixels=599)[0]
    assert ImageFiles([fine], test_transform(8, 8), max_pixels=600)[0][0].shape == (3, 8, 8)
    for tool, argv in ((search, ["snapshot.pt", "--query", fine]), (evaluate, ["snapshot.pt"])):
        monkeypatch.setattr(sys, "argv", [tool.__file__, *argv, "--max_image_pixels", "0"])
        with pytest.raises(SystemExit) as exit_status:
            tool.main(None)
        assert exit_status.value.code == 2
        assert "--max_image_pixels: expected an integer >= 1, got 0" in capsys.readouterr().err


def test_grid_and_curves_inputs_that_are_not_utf8_name_file_and_line(tmp_path):
    (tmp_path / "metrics.jsonl").write_bytes(b'{"epoch": 0}\n{"epoch": 1, "note": "\xe9"}\n')
    with pytest.raises(ValueError, match=r"metrics\.jsonl:2: not UTF-8 text \(byte 0xE9 at column 23\)"):
        visualize.read_metrics(tmp_path / "metrics.jsonl")
    (tmp_path / "r.json").write_bytes(b'{"results":\n [{"query": "\xff"}]}')
    with pytest.raises(ValueError, match=r"r\.json:2: not UTF-8 text \(byte 0xFF at column 14\)"):
        visualize.read_results(tmp_path / "r.json")


def test_the_lr_of_every_step_is_recomputed_from_the_run_directory(run):
    records = visualize.read_metrics(run.out / "metrics.jsonl")
    epochs, lrs = visualize.step_learning_rates(run.out / "metrics.jsonl", records)
    snapshot = read_snapshot(run.snapshot)
    steps, cfg = snapshot.steps_per_epoch, from_plain(snapshot.config)
    logged = {record["epoch"]: record["lr"] for record in records if "lr" in record}
    assert len(lrs) == max(logged) * steps and epochs[-1] == max(logged)
    for epoch, lr in logged.items():
        assert lrs[epoch * steps - 1] == pytest.approx(lr, rel=1e-12)
    base_lr = cfg.lr * cfg.batch_size / cfg.lr_batch_size  # one process
    assert lrs[0] == pytest.approx(cfg.warmup_factor * base_lr)  # the warm-up starts low
    warmup = round(cfg.warmup_epochs * steps)
    assert lrs[:warmup + 1] == sorted(lrs[:warmup + 1]) and lrs[warmup] == pytest.approx(base_lr)


def fake_run(path: Path, world_size: int, steps: int, **fields) -> Path:
    """A run directory as the trainer leaves it, for a run on `world_size` processes."""
    from support.schedule import lr_schedule

    cfg = Config(out_dir=str(path), **fields)
    path.mkdir()
    (path / "config.toml").write_text(dump_toml(cfg))
    snapshot = Snapshot(format_version=SNAPSHOT_VERSION, model={"w": torch.zeros(3)}, optimizer={"state": {}, "param_groups": []},
                        scaler={}, epochs_run=cfg.total_epochs, step_in_epoch=0, steps_per_epoch=steps, global_batch=1,
                        num_classes=2, config=to_plain(cfg), history=[], best={}, rng={"torch": torch.get_rng_state(), "cuda": []})
    write_snapshot(snapshot, path / "snapshot.pt")
    base_lr = cfg.lr * cfg.batch_size * world_size / cfg.lr_batch_size
    schedule = lr_schedule(base_lr, cfg.total_epochs, steps, cfg.warmup_epochs, cfg.warmup_factor, cfg.min_lr)
    records = [{"epoch": 0, "recall@1": 1.0}]
    records += [{"epoch": e, "loss": 1.0, "lr": float(schedule[e * steps - 1])} for e in range(1, cfg.total_epochs)]
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return path / "metrics.jsonl"


def test_the_step_lr_of_a_multi_process_run_with_a_floor(tmp_path):
    from support.schedule import lr_schedule

    metrics = fake_run(tmp_path / "run", world_size=8, steps=7, total_epochs=5, warmup_epochs=2,
                       warmup_factor=0.1, min_lr=1e-3, lr=0.2, batch_size=16)
    epochs, lrs = visualize.step_learning_rates(metrics, visualize.read_metrics(metrics))
    expected = lr_schedule(0.2 * 16 * 8 / 256, 5, 7, 2, 0.1, 1e-3)[:4 * 7]  # four epochs logged
    assert lrs == pytest.approx(expected.tolist(), rel=1e-9)
    assert epochs[0] == pytest.approx(1 / 7) and epochs[-1] == 4
    records = visualize.read_metrics(metrics)
    records[2]["lr"] *= 1.5  # a schedule the config does not describe
    with pytest.raises(ValueError, match="another schedule"):
        visualize.step_learning_rates(metrics, records)
    (tmp_path / "run" / "snapshot.pt").unlink()
    with pytest.raises(ValueError, match=r"snapshot\.pt: no such snapshot file \(its steps per epoch"):
        visualize.step_learning_rates(metrics, visualize.read_metrics(metrics))


def test_curves_without_matplotlib_say_how_to_install_it(run, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` fail
    monkeypatch.setattr(sys, "argv", ["visualize.py", "curves", str(run.out / "metrics.jsonl"),
                                      "--out", str(tmp_path / "c.png")])
    assert run_cli(visualize.main) == 1
    assert "pip install matplotlib" in capsys.readouterr().err
    assert not (tmp_path / "c.png").exists()


def test_curves_png(run, tmp_path):
    pytest.importorskip("matplotlib", reason="matplotlib is an optional extra")
    assert visualize.main(["curves", str(run.out / "metrics.jsonl"), "--out", str(tmp_path / "c.png")]) == 0
    assert Image.open(tmp_path / "c.png").size[0] > 300


def test_curves_of_a_run_directory_without_snapshot_say_so(tmp_path, capsys):
    pytest.importorskip("matplotlib", reason="matplotlib is an optional extra")
    metrics = fake_run(tmp_path / "run", world_size=2, steps=3, total_epochs=3)
    (tmp_path / "run" / "snapshot.pt").unlink()
    assert visualize.main(["curves", str(metrics), "--out", str(tmp_path / "c.png")]) == 0
    assert "note: the lr of every step is not shown" in capsys.readouterr().err
    assert (tmp_path / "c.png").is_file()


def test_curves_name_a_bad_metrics_line(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"epoch": 0, "recall@1": 1.0}\n{"epoch": 1, "loss":\n')
    with pytest.raises(ValueError, match="metrics.jsonl:2"):
        visualize.read_metrics(tmp_path / "metrics.jsonl")


# ------------------------------------------------------------------------------------------
# export


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
def test_torchscript_export_matches_eager_and_evaluates(run, tmp_path, capsys):
    path = tmp_path / "model.torchscript.pt"
    assert export.main([str(run.snapshot), "--torchscript", str(path)]) == 0
    assert "max |export - eager| =" in capsys.readouterr().out
    extra = {"retrieval.json": ""}
    scripted = torch.jit.load(str(path), _extra_files=extra)
    metadata = json.loads(extra["retrieval.json"])
    assert (metadata["resize"], metadata["crop"]) == (32, 28)  # configs/smoke.toml
    eager = load_model(run.snapshot)
    images = torch.randn(5, 3, 28, 28, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert (scripted(images) - eager.module(images)).abs().max().item() < 1e-5
    assert load_model(path).fingerprint == eager.fingerprint  # an index serves both
    assert evaluate.main([str(path), "--out", str(tmp_path / "m.json")]) == 0
    same_metrics(read_json(tmp_path / "m.json"), run.last_eval)


def test_torch_export_program_matches_eager_and_evaluates(run, tmp_path, capsys):
    path = tmp_path / "model.pt2"
    assert export.main([str(run.snapshot), "--exported", str(path)]) == 0
    assert "ExportedProgram written to" in capsys.readouterr().out
    assert not (tmp_path / "model.torchscript.pt").exists()  # only what was asked for
    extra = {"retrieval.json": ""}
    program = torch.export.load(str(path), extra_files=extra).module()
    assert (json.loads(extra["retrieval.json"])["crop"]) == 28
    eager = load_model(run.snapshot)
    for batch in (1, 7):  # the batch dimension stayed dynamic
        images = torch.randn(batch, 3, 28, 28, generator=torch.Generator().manual_seed(batch))
        with torch.no_grad():
            assert (program(images) - eager.module(images)).abs().max().item() < 1e-5
    loaded = load_model(path)
    assert loaded.fingerprint == eager.fingerprint and loaded.source.startswith("ExportedProgram")
    assert evaluate.main([str(path), "--out", str(tmp_path / "m.json")]) == 0
    same_metrics(read_json(tmp_path / "m.json"), run.last_eval)
    with pytest.raises(ValueError, match="already an export"):
        export.main([str(path), "--exported", str(tmp_path / "again.pt2")])


# CLIP's statistics and resize: a backbone whose weights expect another normalisation than ImageNet's.
CLIP = Preprocessing((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711), "bicubic")


def test_every_tool_applies_the_preprocessing_the_snapshot_records(run, tmp_path):
    path = tmp_path / "snapshot.pt"
    write_snapshot(dataclasses.replace(read_snapshot(run.snapshot), preprocessing=CLIP.as_dict()), path)
    model = load_model(path)
    assert model.preprocess == Preprocess.of(32, 28, CLIP) != load_model(run.snapshot).preprocess
    assert model.fingerprint != load_model(run.snapshot).fingerprint  # the same weights, other inputs
    paths = [sample for sample, _ in InShop(run.root, "gallery").samples[:3]]
    # What training evaluated with: datautils' test transform for the arch's statistics.
    training = test_transform(32, 28, **CLIP.transform_kwargs())
    with torch.no_grad():
        expected = torch.nn.functional.normalize(
            model.module(torch.stack([training(load_image(p)) for p in paths])), dim=1)
    torch.testing.assert_close(search.embed_images(model, paths, torch.device("cpu")), expected)
    exported = tmp_path / "model.pt2"
    assert export.main([str(path), "--exported", str(exported)]) == 0
    extra = {"retrieval.json": ""}
    torch.export.load(str(exported), extra_files=extra)
    metadata = json.loads(extra["retrieval.json"])
    assert (metadata["interpolation"], metadata["mean"]) == ("bicubic", list(CLIP.mean_255))
    assert "(bicubic, aspect ratio not kept)" in metadata["input"]
    from_export = load_model(exported)
    assert from_export.preprocess == model.preprocess and from_export.fingerprint == model.fingerprint
    retriever = load_retriever(exported, device="cpu")
    torch.testing.assert_close(retriever.embed(paths), expected, rtol=1e-5, atol=1e-5)


def test_export_metadata_without_an_interpolation_is_bilinear_and_bad_statistics_are_one_line():
    old = {"resize": 32, "crop": 28, "mean": [123.675, 116.28, 103.53], "std": [58.395, 57.12, 57.375]}
    assert preprocess_of(old) == Preprocess(32, 28)  # format 1 files: ImageNet's, bilinear
    assert fingerprint({}, Preprocess(32, 28)) != fingerprint({}, Preprocess(32, 28, interpolation="bicubic"))
    with pytest.raises(ValueError, match=r"^preprocessing mean: expected 3 numbers"):
        preprocess_of({**old, "mean": [123.675, 116.28]})
    with pytest.raises(ValueError, match=r"^preprocessing interpolation: expected 'bilinear' or 'bicubic'"):
        preprocess_of({**old, "interpolation": "nearest"})


def test_onnx_export_matches_eager(run, tmp_path):
    missing = [name for name in export.ONNX_PACKAGES if importlib.util.find_spec(name) is None]
    if missing:
        pytest.skip(f"ONNX export is an optional extra; not installed: {', '.join(missing)}")
    import onnx
    import onnxruntime

    path = tmp_path / "model.onnx"
    assert export.main([str(run.snapshot), "--onnx", str(path)]) == 0
    metadata = {entry.key: entry.value for entry in onnx.load(str(path)).metadata_props}
    assert json.loads(metadata["retrieval"])["crop"] == 28
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    images = torch.randn(4, 3, 28, 28, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected = load_model(run.snapshot).module(images)
    (exported,) = session.run(None, {"images": images.numpy()})
    assert (torch.from_numpy(exported) - expected).abs().max().item() < 1e-4


def test_onnx_export_names_missing_packages(run, tmp_path, monkeypatch):
    monkeypatch.setattr(export, "ONNX_PACKAGES", ("onnx_package_that_is_not_installed",))
    with pytest.raises(ImportError, match="pip install onnx_package_that_is_not_installed"):
        export.main([str(run.snapshot), "--onnx", str(tmp_path / "model.onnx")])
    assert not (tmp_path / "model.onnx").exists()


# ------------------------------------------------------------------------------------------
# Backbone families beyond ResNet


def tiny_vit(weights=None, image_size=224):
    """torchvision's VisionTransformer class (what vit_b_16 builds) at a fraction of its size."""
    from torchvision.models.vision_transformer import VisionTransformer

    return VisionTransformer(image_size, 16, num_layers=1, num_heads=2, hidden_dim=16, mlp_dim=32)


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
@pytest.mark.parametrize("arch", ["mobilenet_v3_small", "vit_b_16"])
def test_torchscript_export_of_a_conv_net_and_a_vit_matches_eager(tmp_path, monkeypatch, arch):
    from arcface import model as model_module
    from tools.common import Embedder, LoadedModel, Preprocess, fingerprint

    monkeypatch.setitem(model_module._BUILDERS, "vit_b_16", tiny_vit)
    torch.manual_seed(0)
    embedder = Embedder(model_module.build_model(5, arch, embedding_dim=8, image_size=32)).eval()
    preprocess = Preprocess(36, 32)
    eager = LoadedModel(embedder, preprocess, fingerprint(embedder.state_dict(), preprocess), arch, None)
    path = tmp_path / "model.torchscript.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("error", torch.jit.TracerWarning)  # export keeps ViT's to itself
        assert export.export_torchscript(eager, path, export.export_metadata(eager)) < 1e-5
    exported = load_model(path)
    images = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert (exported.module(images) - embedder(images)).abs().max().item() < 1e-5
    assert exported.fingerprint == eager.fingerprint and exported.preprocess == preprocess


def test_mmpretrain_checkpoints_are_resnets_only(tmp_path):
    with pytest.raises(ValueError, match=r"--arch convnext_tiny: --mmpretrain loads ResNet checkpoints only"):
        evaluate.main(["--mmpretrain", str(tmp_path / "any.pth"), "--arch", "convnext_tiny", "--num_classes", "3"])
    with pytest.raises(ValueError, match=r"arch: 'resnet_50' is not a known backbone; did you mean 'resnet50'"):
        evaluate.main(["--mmpretrain", str(tmp_path / "any.pth"), "--arch", "resnet_50", "--num_classes", "3"])


@pytest.fixture(scope="module")
def backbone_synthetic_dir(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("backbone_synthetic"))


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
@pytest.mark.parametrize("arch", ["convnext_tiny", "vit_b_16", "efficientnet_b0"])
def test_a_backbone_trains_evaluates_and_exports_end_to_end(tmp_path, backbone_synthetic_dir, arch):
    cfg = parse_config(["1", "--config", str(ROOT / "configs" / "smoke.toml"), "--arch", arch, "--crop", "32",
                        "--resize", "36", "--out_dir", str(tmp_path), "--synthetic_dir", backbone_synthetic_dir])
    assert single_gpu.main(cfg) == 0
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    last_eval = [record for record in records if "recall@1" in record][-1]
    assert last_eval["epoch"] == 1
    snapshot = tmp_path / "snapshot.pt"
    assert evaluate.main([str(snapshot), "--out", str(tmp_path / "m.json")]) == 0
    same_metrics(read_json(tmp_path / "m.json"), last_eval)
    exported = tmp_path / "model.torchscript.pt"
    assert export.main([str(snapshot), "--torchscript", str(exported)]) == 0
    assert evaluate.main([str(exported), "--out", str(tmp_path / "e.json")]) == 0
    same_metrics(read_json(tmp_path / "e.json"), last_eval)
    if arch == "vit_b_16":  # another crop: the position embeddings are interpolated to it
        model = load_model(snapshot, resize=52, crop=48)
        assert model.module(torch.randn(2, 3, 48, 48)).shape == (2, 768)
        with pytest.raises(ValueError, match=r"crop: vit_b_16 .* multiple of 16; got 40"):
            load_model(snapshot, crop=40)
