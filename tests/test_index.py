"""tools/catalog.py, tools/index.py and bench/bench_index.py on small clustered catalogs (2,000 x 32).

Exact search and the catalog checks need no FAISS; the tests that build an index skip where the
optional extra is not installed.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from bench import bench_index
from tools import catalog as cat
from tools import index as index_cli

ROOT = Path(__file__).resolve().parents[1]
N, DIM = 2000, 32


def need_faiss():
    return pytest.importorskip("faiss", reason="faiss-cpu is an optional extra (pip install faiss-cpu)")


def clustered(n: int = N, dim: int = DIM, seed: int = 0, stream: int = 1) -> np.ndarray:
    return bench_index.ClusteredEmbeddings(N, dim, seed).rows(n, stream)


def write_catalog(folder: Path, embeddings: np.ndarray, fingerprint: str = "abc123", **meta_changes) -> Path:
    """A catalog folder as tools/embed.py writes it."""
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / cat.EMBEDDINGS_FILE, embeddings)
    (folder / cat.PATHS_FILE).write_text("".join(f"item{row // 10}/img{row}.jpg\n" for row in range(len(embeddings))))
    meta = {"fingerprint": fingerprint, "dim": embeddings.shape[1], "count": embeddings.shape[0],
            "dtype": embeddings.dtype.name, "preprocess": {"resize": 64, "crop": 56}, "images": "photos"}
    meta.update(meta_changes)
    (folder / cat.META_FILE).write_text(json.dumps(meta))
    return folder


@pytest.fixture
def catalog_dir(tmp_path) -> Path:
    return write_catalog(tmp_path / "out", clustered())


def reference_top_k(embeddings: np.ndarray, queries: np.ndarray, k: int) -> list[list[int]]:
    """Plain Python: every row by score descending, then row ascending (float64 scores)."""
    scores = queries.astype(np.float64) @ embeddings.astype(np.float64).T
    return [sorted(range(len(embeddings)), key=lambda r: (-row[r], r))[:k] for row in scores]


def one_line(error: pytest.ExceptionInfo) -> str:
    text = str(error.value)
    assert "\n" not in text.strip(), text
    return text


# ------------------------------------------------------------------------------------------
# Exact search (no FAISS)


def test_exact_search_matches_a_plain_reference_and_orders_ties_by_row():
    rng = np.random.default_rng(1)
    base = cat._unit_queries(rng.standard_normal((40, 8)), 8)
    # Row 5 repeated at rows 17, 30 and 39, row 2 at 33: ties inside a block, across blocks and at the k-th place.
    embeddings = base.copy()
    embeddings[[17, 30, 39]] = base[5]
    embeddings[33] = base[2]
    queries = np.concatenate([base[[5, 2, 0]], cat._unit_queries(rng.standard_normal((5, 8)), 8)])
    for k in (1, 2, 3, 4, 7):
        for block_rows in (7, 16, 64):  # the blocks split the equal rows differently
            scores, rows = cat.exact_search(embeddings, queries, k, block_rows=block_rows, query_chunk=3)
            assert rows.tolist() == reference_top_k(embeddings, queries, k), (k, block_rows)
            expected = np.take_along_axis(queries @ embeddings.T, rows, 1)
            np.testing.assert_allclose(scores, expected, rtol=0, atol=1e-6)
    _, rows = cat.exact_search(embeddings, base[[5]], 4, block_rows=7)
    assert rows.tolist() == [[5, 17, 30, 39]]


def test_search_a_catalog_exactly_with_float16_rows_and_k_above_n(tmp_path):
    embeddings = clustered(300).astype(np.float16)
    catalog = cat.read_catalog(write_catalog(tmp_path / "out", embeddings))
    assert catalog.embeddings.dtype == np.float16 and isinstance(catalog.embeddings, np.memmap)
    queries = torch.from_numpy(clustered(5, stream=2))
    scores, rows = cat.search_index(catalog, queries, k=500)
    assert rows.shape == (5, 300) and sorted(rows[0].tolist()) == list(range(300))
    assert rows[:, :10].tolist() == reference_top_k(embeddings.astype(np.float32), queries.numpy(), 10)
    assert np.all(np.diff(scores, axis=1) <= 0)


def test_queries_of_another_dimension_are_refused(catalog_dir):
    catalog = cat.read_catalog(catalog_dir)
    with pytest.raises(cat.CatalogError, match=r"queries of shape \(3, 16\): expected \(Q, 32\)"):
        cat.search_index(catalog, np.ones((3, 16), np.float32), 5)
    with pytest.raises(cat.CatalogError, match="all zeros"):
        cat.search_index(catalog, np.zeros((1, DIM), np.float32), 5)


# ------------------------------------------------------------------------------------------
# Bad catalog files: one line naming the file and what was expected


def _rewrite_meta(folder: Path, **changes) -> None:
    meta = json.loads((folder / cat.META_FILE).read_text())
    meta.update(changes)
    (folder / cat.META_FILE).write_text(json.dumps(meta))


def _drop_key(folder: Path, key: str) -> None:
    meta = json.loads((folder / cat.META_FILE).read_text())
    del meta[key]
    (folder / cat.META_FILE).write_text(json.dumps(meta))


def _bad_row(folder: Path, value: float) -> None:
    embeddings = np.load(folder / cat.EMBEDDINGS_FILE)
    embeddings[1234, 7] = value
    np.save(folder / cat.EMBEDDINGS_FILE, embeddings)


CORRUPTIONS = {
    "missing meta": (lambda f: (f / cat.META_FILE).unlink(), "meta.json: missing"),
    "meta not json": (lambda f: (f / cat.META_FILE).write_text("{not json"), "meta.json: not valid UTF-8 JSON"),
    "meta a list": (lambda f: (f / cat.META_FILE).write_text("[1]"), "meta.json: expected a JSON object"),
    "meta without dtype": (lambda f: _drop_key(f, "dtype"),
                           "meta.json: \"dtype\" must be 'float32' or 'float16', missing"),
    "meta count a string": (lambda f: _rewrite_meta(f, count="2000"), "meta.json: \"count\" must be an integer"),
    "missing embeddings": (lambda f: (f / cat.EMBEDDINGS_FILE).unlink(), "embeddings.npy: missing"),
    "embeddings not npy": (lambda f: (f / cat.EMBEDDINGS_FILE).write_bytes(b"\x00garbage" * 10),
                           "embeddings.npy: not a readable .npy array"),
    "embeddings 1-d": (lambda f: np.save(f / cat.EMBEDDINGS_FILE, np.zeros(N, np.float32)),
                       "embeddings.npy: expected a 2-d (count, dim) array, got shape (2000,)"),
    "embeddings float64": (lambda f: np.save(f / cat.EMBEDDINGS_FILE, np.zeros((N, DIM))),
                           "embeddings.npy: dtype float64, expected float32 or float16"),
    "dtype vs meta": (lambda f: _rewrite_meta(f, dtype="float16"),
                      "embeddings.npy: dtype float32, but meta.json says float16"),
    "dim vs meta": (lambda f: _rewrite_meta(f, dim=64), "embeddings.npy: 32 columns, but meta.json says dim 64"),
    "count vs meta": (lambda f: _rewrite_meta(f, count=1999),
                      "embeddings.npy: 2000 rows, but meta.json says count 1999"),
    "missing paths": (lambda f: (f / cat.PATHS_FILE).unlink(), "paths.txt: missing"),
    "rows vs paths": (lambda f: (f / cat.PATHS_FILE).write_text("a.jpg\nb.jpg\n"),
                      "paths.txt: 2 paths, expected one per row of embeddings.npy (2000)"),
    "empty path line": (lambda f: (f / cat.PATHS_FILE).write_text("a.jpg\n\n" + "c.jpg\n" * (N - 2)),
                        "paths.txt: line 2 is empty"),
    "paths not utf8": (lambda f: (f / cat.PATHS_FILE).write_bytes(b"a.jpg\n\xff.jpg\n" + b"c.jpg\n" * (N - 2)),
                       "paths.txt: line 2 is not valid UTF-8"),
    "nan row": (lambda f: _bad_row(f, np.nan), "embeddings.npy: row 1234 holds a non-finite value"),
    "row not unit": (lambda f: _bad_row(f, 3.0), "embeddings.npy: row 1234 has norm"),
}


@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_bad_catalog_files_give_one_line_naming_the_file(catalog_dir, case):
    corrupt, message = CORRUPTIONS[case]
    corrupt(catalog_dir)
    with pytest.raises(cat.CatalogError) as error:
        cat.read_catalog(catalog_dir)
    assert message in one_line(error) and str(catalog_dir) in str(error.value)


def test_a_missing_catalog_folder_is_named(tmp_path):
    with pytest.raises(cat.CatalogError, match="no such catalog folder") as error:
        cat.read_catalog(tmp_path / "nowhere")
    one_line(error)


# ------------------------------------------------------------------------------------------
# The auto rule


GiB, MiB = 2**30, 2**20


def test_auto_picks_flat_then_hnsw_then_ivfpq_as_the_rule_says():
    plan = cat.plan_index
    # flat: at most FLAT_MAX_ROWS rows and 4ND bytes within the budget (or no budget).
    assert plan(cat.FLAT_MAX_ROWS, 512).kind == "flat"
    assert plan(2000, 32, memory_budget=4 * 2000 * 32).kind == "flat"
    # hnsw: more rows, or flat over the budget, and 4D + 8M + 16 bytes per row within it (or no budget).
    assert plan(cat.FLAT_MAX_ROWS + 1, 512).kind == "hnsw"
    assert plan(1_000_000, 512).kind == "hnsw"
    hnsw_1m = 1_000_000 * (4 * 512 + 8 * cat.HNSW_M + 16)
    assert cat.hnsw_bytes(1_000_000, 512) == hnsw_1m
    assert plan(1_000_000, 512, memory_budget=hnsw_1m).kind == "hnsw"
    assert plan(50_000, 512, memory_budget=4 * 50_000 * 512 - 1).kind == "ivfpq"  # flat just over: hnsw too
    # ivfpq: otherwise; nlist = 4 sqrt(N), the largest code m dividing D within the budget, <= 56 bytes.
    ivfpq = plan(1_000_000, 512, memory_budget=2 * GiB)
    assert ivfpq.kind == "ivfpq" and hnsw_1m > 2 * GiB
    assert ivfpq.params == {"nlist": 4000, "m": 32, "nbits": 8, "nprobe": cat.IVFPQ_NPROBE, "rerank": cat.IVFPQ_RERANK}
    assert ivfpq.bytes_per_vector(1_000_000) <= 64
    assert ivfpq.estimated_bytes == 1_000_000 * (32 + 8) + 4 * 512 * (4000 + 256)
    tight = plan(1_000_000, 512, memory_budget=30 * 10**6)  # 16-byte codes need 32.7 MB, 8-byte 24.7 MB
    assert tight.params["m"] == 8 and tight.estimated_bytes <= 30 * 10**6
    assert plan(1_000_000, 384, memory_budget=GiB).params["m"] == 48  # 384's largest divisor <= 56
    assert plan(10_000, 100, kind="ivfpq").params == {"nlist": 250, "m": 50, "nbits": 8, "nprobe": 32,
                                                     "rerank": cat.IVFPQ_RERANK}
    assert cat.ivf_lists(2000) == 2000 // cat.IVF_TRAIN_PER_LIST  # 4 sqrt(N) = 179 would leave < 40 rows per list


def test_auto_refuses_a_budget_nothing_fits_and_explicit_kinds_ignore_it():
    with pytest.raises(cat.CatalogError, match="too small for 1000000 rows of 512 dimensions") as error:
        cat.plan_index(1_000_000, 512, memory_budget=10 * MiB)
    one_line(error)
    with pytest.raises(cat.CatalogError, match="ivfpq needs at least 1000"):
        cat.plan_index(500, 512, memory_budget=1000)
    assert cat.plan_index(1_000_000, 512, "flat", memory_budget=MiB).kind == "flat"
    assert cat.plan_index(1_000_000, 512, "hnsw", memory_budget=MiB).kind == "hnsw"


@pytest.mark.parametrize("text, expected", [("2GiB", 2 * GiB), ("512 MiB", 512 * MiB), ("1.5GB", 1_500_000_000),
                                            ("64m", 64 * MiB), ("1000", 1000)])
def test_memory_budgets_parse(text, expected):
    assert cat.parse_bytes(text) == expected


@pytest.mark.parametrize("text", ["", "two GiB", "2 GiBs", "-1GiB", "0"])
def test_bad_memory_budgets_are_refused(text):
    with pytest.raises(ValueError, match="expected a size"):
        cat.parse_bytes(text)


# ------------------------------------------------------------------------------------------
# FAISS indexes


def test_flat_index_equals_exact_search(catalog_dir):
    need_faiss()
    catalog = cat.read_catalog(catalog_dir)
    built = cat.build_index(catalog, "flat", sample=200)
    assert built.info["recall_at_10"] == 1.0
    queries = clustered(100, stream=2)
    exact_scores, exact_rows = cat.search_index(catalog, queries, 10)
    scores, rows = cat.search_index(built, queries, 10)
    assert rows.tolist() == exact_rows.tolist()
    np.testing.assert_allclose(scores, exact_scores, atol=1e-5)


@pytest.mark.parametrize("kind, threshold", [("hnsw", 0.95), ("ivfpq", 0.9)])
def test_approximate_kinds_reach_their_recall_on_clustered_data(catalog_dir, kind, threshold):
    need_faiss()
    catalog = cat.read_catalog(catalog_dir)
    built = cat.build_index(catalog, kind, sample=200)
    assert built.info["kind"] == kind and built.info["recall_at_10"] >= threshold
    queries = clustered(200, stream=2)  # rows of the same clusters that are not in the catalog
    _, truth = cat.search_index(catalog, queries, 10)
    scores, rows = cat.search_index(built, queries, 10)
    assert cat.recall_at(rows, truth) >= threshold
    exact = np.einsum("qkd,qd->qk", catalog.embeddings[rows], queries)
    np.testing.assert_allclose(scores, exact, atol=1e-5)  # hnsw stores floats; ivfpq re-ranks exactly


def test_ivfpq_without_rerank_is_cheaper_and_less_exact(catalog_dir):
    need_faiss()
    catalog = cat.read_catalog(catalog_dir)
    built = cat.build_index(catalog, "ivfpq", sample=0, rerank=0)
    queries = clustered(200, stream=2)
    _, truth = cat.search_index(catalog, queries, 10)
    _, rows = cat.search_index(built, queries, 10)
    with_rerank = cat.build_index(catalog, "ivfpq", sample=0)
    _, reranked = cat.search_index(with_rerank, queries, 10)
    assert cat.recall_at(rows, truth) <= cat.recall_at(reranked, truth)


def test_saved_index_loads_back_and_searches_the_same(catalog_dir):
    need_faiss()
    catalog = cat.read_catalog(catalog_dir)
    built = cat.build_index(catalog, "hnsw", sample=100)
    cat.save_index(built)
    info = json.loads((catalog_dir / cat.INDEX_INFO_FILE).read_text())
    for key in ("kind", "params", "fingerprint", "dim", "count", "build_seconds", "recall_at_10", "bytes_per_vector"):
        assert key in info
    assert info["index_bytes"] == (catalog_dir / cat.INDEX_FILE).stat().st_size
    loaded = cat.open_searcher(cat.read_catalog(catalog_dir))
    assert isinstance(loaded, cat.CatalogIndex) and loaded.params == built.params
    queries = clustered(50, stream=2)
    assert cat.search_index(loaded, queries, 10)[1].tolist() == cat.search_index(built, queries, 10)[1].tolist()


def test_an_index_of_other_embeddings_is_refused(tmp_path):
    need_faiss()
    folder = write_catalog(tmp_path / "out", clustered())
    cat.save_index(cat.build_index(cat.read_catalog(folder), "flat", sample=0))
    index_files = {name: (folder / name).read_bytes() for name in (cat.INDEX_FILE, cat.INDEX_INFO_FILE)}

    def refused(message: str) -> None:
        for name, data in index_files.items():
            (folder / name).write_bytes(data)
        with pytest.raises(cat.IndexMismatch, match=message) as error:
            cat.load_index(cat.read_catalog(folder))
        assert "rebuild it with: python tools/index.py" in one_line(error)

    write_catalog(folder, clustered(), fingerprint="another-model")
    refused("built for embeddings of model fingerprint abc123, the catalog's are another-model")
    write_catalog(folder, clustered(dim=16))
    refused("built for dim 32, the catalog's embeddings have 16")
    write_catalog(folder, clustered(N + 10))
    refused("built for count 2000, the catalog's embeddings have 2010")
    write_catalog(folder, clustered(seed=1))
    refused("built from other embeddings")


@pytest.mark.parametrize("damage, message", [
    (lambda f: (f / cat.INDEX_INFO_FILE).write_text("{"), "index.json: not valid UTF-8 JSON"),
    (lambda f: (f / cat.INDEX_INFO_FILE).write_text('{"format": "other"}'), "index.json: not an index description"),
    (lambda f: (f / cat.INDEX_FILE).unlink(), "index.faiss: missing, though index.json is there"),
    (lambda f: (f / cat.INDEX_FILE).write_bytes(b"junk"), "index.faiss: 4 bytes, index.json says"),
    (lambda f: _garble_index(f), "index.faiss: cannot be read as a FAISS index"),
])
def test_damaged_index_files_give_one_line_naming_the_file(catalog_dir, damage, message):
    need_faiss()
    cat.save_index(cat.build_index(cat.read_catalog(catalog_dir), "flat", sample=0))
    damage(catalog_dir)
    with pytest.raises(cat.CatalogError, match=message) as error:
        cat.load_index(cat.read_catalog(catalog_dir))
    one_line(error)


def _garble_index(folder: Path) -> None:
    """Same size as index.json records, other bytes: only FAISS itself can tell."""
    path = folder / cat.INDEX_FILE
    path.write_bytes(b"\x07" * path.stat().st_size)


def test_without_faiss_exact_search_works_and_indexes_say_what_to_install(catalog_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "faiss", None)  # import faiss now raises ImportError
    catalog = cat.read_catalog(catalog_dir)
    assert cat.search_index(catalog, clustered(3, stream=2), 5)[1].shape == (3, 5)
    with pytest.raises(cat.FaissMissing, match="pip install faiss-cpu") as error:
        cat.build_index(catalog, "flat")
    one_line(error)
    (catalog_dir / cat.INDEX_INFO_FILE).write_text(json.dumps({
        "format": cat.INDEX_FORMAT, "format_version": cat.INDEX_VERSION, "kind": "flat", "params": {},
        "fingerprint": catalog.fingerprint, "dim": catalog.dim, "count": catalog.count}))
    (catalog_dir / cat.INDEX_FILE).write_bytes(b"x")
    with pytest.raises(cat.FaissMissing, match="pip install faiss-cpu"):
        cat.open_searcher(catalog)


# ------------------------------------------------------------------------------------------
# The command line


def test_cli_bad_arguments_exit_2(catalog_dir, capsys):
    for argv in ([str(catalog_dir), "--kind", "bogus"], [str(catalog_dir), "--memory_budget", "lots"],
                 [str(catalog_dir), "--sample", "-1"], [str(catalog_dir), "--threads", "0"], []):
        with pytest.raises(SystemExit) as exit_info:
            index_cli.run(argv)
        assert exit_info.value.code == 2, argv
    assert "invalid choice: 'bogus'" in capsys.readouterr().err


def test_cli_builds_atomically_and_reports(catalog_dir, capsys):
    need_faiss()
    before = {p.name for p in catalog_dir.iterdir()}
    assert index_cli.run([str(catalog_dir), "--kind", "auto", "--sample", "100", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "kind flat (auto: 2000 rows <= 100000" in out and "bytes per vector" in out and "recall@10 1.0000" in out
    assert {p.name for p in catalog_dir.iterdir()} == before | {cat.INDEX_FILE, cat.INDEX_INFO_FILE}
    info = json.loads((catalog_dir / cat.INDEX_INFO_FILE).read_text())
    assert info["kind"] == "flat" and info["requested_kind"] == "auto" and info["recall_sample"] == 100


def test_cli_memory_budget_picks_ivfpq_codes_that_fit(catalog_dir, capsys):
    need_faiss()
    # 100 kB: flat needs 256 kB, hnsw 800 kB; ivfpq with 50 lists and 16-byte codes 87 kB (32-byte: 119 kB).
    assert index_cli.run([str(catalog_dir), "--memory_budget", "100kB", "--sample", "50"]) == 0
    out = capsys.readouterr().out
    assert "kind ivfpq (auto: flat's 250.00 KiB over 97.66 KiB, hnsw's 781.25 KiB too; 16-byte codes" in out
    info = json.loads((catalog_dir / cat.INDEX_INFO_FILE).read_text())
    assert info["params"]["m"] == 16 and info["params"]["nlist"] == 50 and info["memory_budget"] == 100_000
    assert info["index_bytes"] <= 100_000 and abs(info["index_bytes"] - info["estimated_bytes"]) < 0.02 * 100_000


def test_cli_leaves_no_temporary_file_when_a_write_fails(catalog_dir, monkeypatch, capsys):
    faiss = need_faiss()
    assert index_cli.run([str(catalog_dir), "--kind", "flat", "--sample", "0"]) == 0
    old = {name: (catalog_dir / name).read_bytes() for name in (cat.INDEX_FILE, cat.INDEX_INFO_FILE)}

    def full_disk(index, path):
        Path(path).write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(faiss, "write_index", full_disk)
    assert index_cli.run([str(catalog_dir), "--kind", "hnsw", "--sample", "0"]) == 1
    assert capsys.readouterr().err.strip().splitlines() == ["error: [Errno 28] No space left on device"]
    assert {p.name for p in catalog_dir.iterdir()} == {cat.EMBEDDINGS_FILE, cat.PATHS_FILE, cat.META_FILE,
                                                       cat.INDEX_FILE, cat.INDEX_INFO_FILE}
    assert {name: (catalog_dir / name).read_bytes() for name in old} == old  # the previous index is intact


def test_cli_script_says_bad_files_in_one_line(tmp_path):
    folder = write_catalog(tmp_path / "out", clustered(50))
    (folder / cat.PATHS_FILE).write_text("only.jpg\n")
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "index.py"), str(folder)],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [f"error: {folder / cat.PATHS_FILE}: 1 paths, expected one per row "
                                                f"of embeddings.npy (50)"]


# ------------------------------------------------------------------------------------------
# The benchmark


def test_bench_index_runs_small_and_ends_with_json(capsys):
    need_faiss()
    threads = torch.get_num_threads()
    try:
        bench_index.main(["--n", "1500", "--dim", "16", "--queries", "20", "--kinds", "flat,hnsw,ivfpq"])
    finally:
        torch.set_num_threads(threads)
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [row["kind"] for row in result["results"]] == ["flat", "hnsw", "ivfpq"]
    for row in result["results"]:
        assert {"kind", "recall_at_10", "ms_per_query", "bytes_per_vector", "build_s"} <= set(row)
        assert 0 <= row["recall_at_10"] <= 1 and row["ms_per_query"] > 0 and row["bytes_per_vector"] > 0
    assert result["results"][0]["recall_at_10"] == 1.0


def test_bench_index_rows_are_clustered_unit_vectors():
    data = bench_index.ClusteredEmbeddings(200_000, 64, seed=0)  # 2,000 items
    rows = data.rows(2000, stream=1)
    np.testing.assert_allclose(np.linalg.norm(rows, axis=1), 1, atol=1e-5)
    assert np.array_equal(rows, bench_index.ClusteredEmbeddings(200_000, 64, seed=0).rows(2000, stream=1))
    assert not np.array_equal(rows, data.rows(2000, stream=2))
    centres = data.centres @ data.centres.T
    assert abs(float(np.median(centres))) < 0.05 and np.median(np.sort(centres, 1)[:, -2]) > 0.3
    categories = bench_index.ClusteredEmbeddings(200_000, 64, seed=0, layout="categories")  # 20 categories
    centres = categories.centres @ categories.centres.T
    assert abs(float(np.median(centres))) < 0.1  # most items lie in other categories ...
    assert np.median(np.sort(centres, 1)[:, -2]) > 0.4  # ... each has near ones in its own
