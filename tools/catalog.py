"""A catalog folder of embeddings and the FAISS index built beside it (library; the CLI is tools/index.py).

tools/embed.py writes a catalog folder OUT:

    OUT/embeddings.npy   (N, D) float32 or float16, L2-normalised rows
    OUT/paths.txt        one image path per line (relative to the images folder), in row order
    OUT/meta.json        {"fingerprint", "dim", "count", "dtype", "preprocess", "images", ...}

and tools/index.py adds an index for fast search:

    OUT/index.faiss      the FAISS index (inner product: the rows are unit vectors, so cosine)
    OUT/index.json       kind, parameters, fingerprint, dim, count, build seconds, measured recall@10

    catalog = read_catalog("OUT")                    # embeddings memory-mapped, every file checked
    index = build_index(catalog, "auto", memory_budget=2 * 2**30)
    save_index(index)                                # OUT/index.faiss + OUT/index.json, atomically
    scores, rows = search_index(open_searcher(catalog), queries, k=10)   # index if built, else exact

Index kinds and how `auto` picks one (N rows of D dimensions, budget B bytes for the index in
memory; the embeddings themselves stay on disk, memory-mapped, and do not count):

    flat   exact inner product over all rows, 4D bytes per row. auto: N <= FLAT_MAX_ROWS and
           B (if given) >= 4ND.
    hnsw   a graph (HNSW_M links per row and layer, 2 x HNSW_M on the bottom layer) over the
           float rows, about 4D + 8M + 16 bytes per row. auto: otherwise, when B (if given) holds
           that.
    ivfpq  an inverted file of nlist = 4 sqrt(N) lists (at most N / IVF_TRAIN_PER_LIST) with
           product-quantised residuals: m code bytes + an 8-byte row id per row, plus the
           centroids. auto: otherwise; m is the largest divisor of D with m + 8 plus the
           centroids' share within B / N, and m <= IVFPQ_MAX_CODE_BYTES (so at most 64 bytes per
           row). Its search re-ranks IVFPQ_RERANK x k candidates by their exact cosine read from
           the memory-mapped embeddings, which the catalog keeps anyway.

Exact search (a Catalog given to `search_index`) needs no FAISS: chunked matrix products and a
top-k whose equal scores are ordered by row, lowest first. FAISS is an optional extra (`pip
install faiss-cpu`); where `faiss.get_num_gpus() > 0`, flat and ivfpq indexes search on the GPU
and ivfpq trains there, falling back to the CPU on any failure.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from support.errors import UserError
# The one import of the project's atomic writer: a temporary file next to the target, flushed,
# then os.replace'd onto it. Change this line alone if the module is renamed.
from support.atomicfile import atomic_output

EMBEDDINGS_FILE, PATHS_FILE, META_FILE = "embeddings.npy", "paths.txt", "meta.json"
INDEX_FILE, INDEX_INFO_FILE = "index.faiss", "index.json"
INDEX_FORMAT, INDEX_VERSION = "arcface-catalog-index", 1
DTYPES = ("float32", "float16")
KINDS = ("flat", "hnsw", "ivfpq", "auto")

# The auto rule and the defaults of each kind. HNSW and IVF-PQ values were chosen with
# bench/bench_index.py at 1M x 512 clustered unit vectors (docs/CATALOG.md): HNSW recall@10 1.0 at
# 0.80 ms per query on one thread (efSearch 128; 0.43 ms at 64), IVF-PQ 1.0 at 49 bytes per row; on
# its worst-case layout (--data categories) HNSW falls to 0.81, IVF-PQ stays at 0.9999. efSearch
# 128 rather than 64: In-Shop-size metrics through HNSW then stay within 0.01 points of exact
# search (bench/bench_catalog_eval.py), at 64 mAP@10 lost 0.13 to 0.17.
FLAT_MAX_ROWS = 100_000  # up to here exact search takes ~0.7 ms per query on one thread at D = 512 (6.7 at 1M)
HNSW_M = 32  # links per row and layer (2 x M on the bottom layer)
HNSW_EF_CONSTRUCTION = 80  # candidate list while building: graph quality against build time
HNSW_EF_SEARCH = 128  # candidate list while searching (at least k)
IVF_LISTS_PER_SQRT_ROWS = 4  # nlist = 4 sqrt(N)
IVF_TRAIN_PER_LIST = 40  # k-means sample per list: FAISS warns below 39
IVFPQ_MIN_ROWS = 1000  # the product quantiser trains 256 centroids per sub-vector
IVFPQ_MAX_CODE_BYTES = 56  # + the 8-byte row id = 64 bytes per row
IVFPQ_NPROBE = 32  # lists scanned per query
IVFPQ_RERANK = 10  # candidates re-ranked exactly: IVFPQ_RERANK x k
ID_BYTES = 8  # an inverted list stores each row's id as int64
PQ_CENTROIDS = 256  # 8-bit codes
KMEANS_ITERATIONS = 10
RECALL_K = 10
ADD_CHUNK_ROWS = 65_536  # rows converted to float32 and added at a time: bounded memory, progress
SCAN_CHUNK_ROWS = 65_536  # rows read at a time by the catalog check and exact search
NORM_TOLERANCE = 1e-2  # |norm - 1| allowed for a row (float16 rounding included)
DIGEST_ROWS = 4096  # rows hashed into index.json: an index of other embeddings is refused


class CatalogError(UserError, ValueError):
    """A catalog or index file that is missing, malformed or inconsistent: one line naming the file."""


class IndexMismatch(CatalogError):
    """An index built from other embeddings (another model, other images) than the catalog's."""


class FaissMissing(UserError, ImportError):
    """FAISS, an optional extra, is not installed."""


# ------------------------------------------------------------------------------------------
# The catalog


@dataclass
class Catalog:
    """A catalog folder: (N, D) unit-row embeddings (memory-mapped), their paths and meta.json."""

    root: Path
    embeddings: np.ndarray  # (N, D) float32 or float16, read-only
    paths: list[str] | None  # None for catalogs built in memory (the benchmark)
    meta: dict[str, Any]

    @property
    def count(self) -> int:
        return int(self.embeddings.shape[0])

    @property
    def dim(self) -> int:
        return int(self.embeddings.shape[1])

    @property
    def fingerprint(self) -> str:
        return str(self.meta["fingerprint"])

    @classmethod
    def from_array(cls, embeddings: np.ndarray, root: str | os.PathLike, fingerprint: str = "in-memory") -> Catalog:
        """A catalog of embeddings already in memory (unchecked), whose index files go to `root`."""
        meta = {"fingerprint": fingerprint, "dim": int(embeddings.shape[1]), "count": int(embeddings.shape[0]),
                "dtype": str(embeddings.dtype)}
        return cls(Path(root), embeddings, None, meta)


def read_catalog(out_dir: str | os.PathLike, verify: bool = True) -> Catalog:
    """Reads and checks a catalog folder; any problem is a CatalogError naming the file.

    `verify` reads every row once (in chunks) to refuse non-finite values and rows that are not
    unit vectors; without it only shapes, dtypes and counts are checked.
    """
    root = Path(out_dir)
    if not root.is_dir():
        raise CatalogError(f"{root}: no such catalog folder; expected one written by tools/embed.py "
                           f"({EMBEDDINGS_FILE}, {PATHS_FILE}, {META_FILE})")
    meta = _read_meta(root / META_FILE)
    embeddings = _load_embeddings(root / EMBEDDINGS_FILE, meta)
    paths = _read_paths(root / PATHS_FILE)
    if len(paths) != embeddings.shape[0]:
        raise CatalogError(f"{root / PATHS_FILE}: {len(paths)} paths, expected one per row of "
                           f"{EMBEDDINGS_FILE} ({embeddings.shape[0]})")
    if verify:
        _check_rows(root / EMBEDDINGS_FILE, embeddings)
    return Catalog(root, embeddings, paths, meta)


def read_json(path: Path, advice: str = "") -> Any:
    """The JSON value of a catalog's file; a file that is not UTF-8 JSON is a CatalogError naming it
    (followed by `advice`)."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CatalogError(f"{path}: not valid UTF-8 JSON ({_first_line(error)}){advice}") from None


def _read_meta(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise CatalogError(f"{path}: missing; expected the catalog's JSON description written by tools/embed.py")
    meta = read_json(path)
    if not isinstance(meta, dict):
        raise CatalogError(f"{path}: expected a JSON object, got {type(meta).__name__}")
    expected = {"fingerprint": "a non-empty string", "dim": "an integer >= 1", "count": "an integer >= 1",
                "dtype": " or ".join(repr(d) for d in DTYPES)}
    valid = {
        "fingerprint": isinstance(meta.get("fingerprint"), str) and bool(meta.get("fingerprint")),
        "dim": _is_int(meta.get("dim")) and meta["dim"] >= 1,
        "count": _is_int(meta.get("count")) and meta["count"] >= 1,
        "dtype": meta.get("dtype") in DTYPES,
    }
    for key, ok in valid.items():
        if not ok:
            got = f"got {meta[key]!r}" if key in meta else "missing"
            raise CatalogError(f"{path}: \"{key}\" must be {expected[key]}, {got}")
    return meta


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _load_embeddings(path: Path, meta: dict[str, Any]) -> np.ndarray:
    if not path.is_file():
        raise CatalogError(f"{path}: missing; expected the (count, dim) embeddings array written by tools/embed.py")
    try:
        # Memory-mapped: a catalog larger than RAM opens at once and only what is read is paged in.
        # allow_pickle stays False: a catalog file can never run code.
        embeddings = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as error:
        raise CatalogError(f"{path}: not a readable .npy array ({_first_line(error)})") from None
    if not isinstance(embeddings, np.ndarray) or embeddings.ndim != 2:
        shape = getattr(embeddings, "shape", None)
        raise CatalogError(f"{path}: expected a 2-d (count, dim) array, got shape {shape}")
    if embeddings.dtype.name not in DTYPES:
        raise CatalogError(f"{path}: dtype {embeddings.dtype.name}, expected float32 or float16")
    if embeddings.dtype.name != meta["dtype"]:
        raise CatalogError(f"{path}: dtype {embeddings.dtype.name}, but {META_FILE} says {meta['dtype']}")
    rows, dim = embeddings.shape
    if dim != meta["dim"]:
        raise CatalogError(f"{path}: {dim} columns, but {META_FILE} says dim {meta['dim']}")
    if rows != meta["count"]:
        raise CatalogError(f"{path}: {rows} rows, but {META_FILE} says count {meta['count']}")
    return embeddings


def _read_paths(path: Path) -> list[str]:
    if not path.is_file():
        raise CatalogError(f"{path}: missing; expected one image path per embedding row")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        line = path.read_bytes()[:error.start].count(b"\n") + 1
        raise CatalogError(f"{path}: line {line} is not valid UTF-8") from None
    paths = text.split("\n")
    if paths and paths[-1] == "":  # the final newline ends the last line, it starts none
        paths.pop()
    for number, line in enumerate(paths, start=1):
        if not line.strip():
            raise CatalogError(f"{path}: line {number} is empty; expected one image path per line")
    return paths


def _check_rows(path: Path, embeddings: np.ndarray) -> None:
    """Every value finite and every row a unit vector, read in chunks (the file may exceed RAM)."""
    for start in range(0, embeddings.shape[0], SCAN_CHUNK_ROWS):
        chunk = np.asarray(embeddings[start:start + SCAN_CHUNK_ROWS], dtype=np.float32)
        finite = np.isfinite(chunk).all(axis=1)
        if not finite.all():
            row = start + int(np.argmin(finite))
            raise CatalogError(f"{path}: row {row} holds a non-finite value (NaN or infinity)")
        norms = np.linalg.norm(chunk, axis=1)
        off = np.abs(norms - 1) > NORM_TOLERANCE
        if off.any():
            row = start + int(np.argmax(off))
            raise CatalogError(f"{path}: row {row} has norm {norms[row - start]:.4g}, expected 1 "
                               "(rows must be L2-normalised)")


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def embeddings_digest(embeddings: np.ndarray) -> str:
    """sha256 of the shape, dtype and up to DIGEST_ROWS evenly spaced rows: cheap at any size,
    and it changes when the embeddings are recomputed (other images, same model and count)."""
    rows = np.unique(np.linspace(0, embeddings.shape[0] - 1, min(DIGEST_ROWS, embeddings.shape[0])).astype(np.int64))
    digest = hashlib.sha256(f"{embeddings.shape}|{embeddings.dtype.name}|".encode())
    digest.update(np.ascontiguousarray(embeddings[rows]).tobytes())
    return digest.hexdigest()[:16]


# ------------------------------------------------------------------------------------------
# Memory budgets and the auto rule


_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(text: str) -> int:
    """'2GiB', '1.5 GB', '512M' (binary, like GiB), '1000000' -> bytes; ValueError otherwise."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS:
        raise ValueError(f"expected a size such as 2GiB, 512MiB, 1.5GB or a number of bytes, got {text!r}")
    value = int(float(match.group(1)) * _UNITS[unit])
    if value < 1:
        raise ValueError(f"expected a size of at least 1 byte, got {text!r}")
    return value


def format_bytes(value: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if value >= size:
            return f"{value / size:.2f} {unit}"
    return f"{value:.0f} B"


@dataclass
class IndexPlan:
    """A kind, its parameters, the index size they imply, and why auto chose it."""

    kind: str
    params: dict[str, Any]
    estimated_bytes: int
    reason: str

    def bytes_per_vector(self, count: int) -> float:
        return self.estimated_bytes / count


def flat_bytes(count: int, dim: int) -> int:
    return 4 * dim * count


def hnsw_bytes(count: int, dim: int, links: int = HNSW_M) -> int:
    """float rows, 2M int32 bottom-layer links, ~1 upper-layer link, level (int32) and offset (int64)."""
    return (4 * dim + 8 * links + 16) * count


def ivf_lists(count: int) -> int:
    """4 sqrt(N), capped so that k-means has IVF_TRAIN_PER_LIST rows per list."""
    return max(1, min(round(IVF_LISTS_PER_SQRT_ROWS * math.sqrt(count)), count // IVF_TRAIN_PER_LIST))


def ivfpq_bytes(count: int, dim: int, nlist: int, code_bytes: int) -> int:
    """codes and ids per row, plus the coarse centroids and the PQ codebooks."""
    return (code_bytes + ID_BYTES) * count + 4 * dim * (nlist + PQ_CENTROIDS)


def pq_code_bytes(count: int, dim: int, nlist: int, memory_budget: int | None) -> int | None:
    """The largest divisor m of D with m <= IVFPQ_MAX_CODE_BYTES whose index fits the budget, or None."""
    for code in range(min(dim, IVFPQ_MAX_CODE_BYTES), 0, -1):
        if dim % code == 0 and (memory_budget is None or ivfpq_bytes(count, dim, nlist, code) <= memory_budget):
            return code
    return None


def plan_index(count: int, dim: int, kind: str = "auto", memory_budget: int | None = None) -> IndexPlan:
    """The kind (auto: the rule in this module's docstring) and its default parameters.

    An explicit kind that does not fit the budget is built anyway (the budget only steers auto),
    except ivfpq, whose code size comes from the budget.
    """
    if kind not in KINDS:
        raise CatalogError(f"unknown index kind {kind!r}; expected one of {', '.join(KINDS)}")
    budget_text = format_bytes(memory_budget) if memory_budget is not None else "no budget"

    def fits(size: int) -> bool:
        return memory_budget is None or size <= memory_budget

    if kind == "flat" or (kind == "auto" and count <= FLAT_MAX_ROWS and fits(flat_bytes(count, dim))):
        reason = f"{count} rows <= {FLAT_MAX_ROWS} and {format_bytes(flat_bytes(count, dim))} within {budget_text}"
        return IndexPlan("flat", {}, flat_bytes(count, dim), reason if kind == "auto" else "requested")
    not_flat = f"{count} rows > {FLAT_MAX_ROWS}" if count > FLAT_MAX_ROWS else \
        f"flat's {format_bytes(flat_bytes(count, dim))} over {budget_text}"
    if kind == "hnsw" or (kind == "auto" and fits(hnsw_bytes(count, dim))):
        reason = f"{not_flat}, and {format_bytes(hnsw_bytes(count, dim))} within {budget_text}"
        params = {"M": HNSW_M, "ef_construction": HNSW_EF_CONSTRUCTION, "ef_search": HNSW_EF_SEARCH}
        return IndexPlan("hnsw", params, hnsw_bytes(count, dim), reason if kind == "auto" else "requested")
    if count < IVFPQ_MIN_ROWS:
        raise CatalogError(f"{count} rows: ivfpq needs at least {IVFPQ_MIN_ROWS} to train its quantisers"
                           + (f", and a flat index ({format_bytes(flat_bytes(count, dim))}) exceeds the "
                              f"memory budget {budget_text}" if kind == "auto" else "; use --kind flat"))
    nlist = ivf_lists(count)
    code = pq_code_bytes(count, dim, nlist, memory_budget)
    if code is None:
        least = ivfpq_bytes(count, dim, nlist, 1)
        raise CatalogError(f"memory budget {budget_text} is too small for {count} rows of {dim} dimensions: "
                           f"the smallest index (ivfpq with 1-byte codes) needs {format_bytes(least)}")
    size = ivfpq_bytes(count, dim, nlist, code)
    params = {"nlist": nlist, "m": code, "nbits": 8, "nprobe": min(IVFPQ_NPROBE, nlist), "rerank": IVFPQ_RERANK}
    reason = (f"{not_flat}, hnsw's {format_bytes(hnsw_bytes(count, dim))} too; {code}-byte codes "
              f"({size / count:.1f} bytes per row with ids and centroids) fit")
    return IndexPlan("ivfpq", params, size, reason if kind == "auto" else "requested")


# ------------------------------------------------------------------------------------------
# FAISS, an optional extra


def import_faiss() -> Any:
    try:
        import faiss
    except ImportError:
        raise FaissMissing("FAISS is not installed, and index files need it: pip install faiss-cpu "
                           "(exact search works without it)") from None
    return faiss


def gpu_count(faiss: Any) -> int:
    try:  # faiss-cpu builds return 0; very old ones lack the function
        return int(faiss.get_num_gpus())
    except Exception:  # noqa: BLE001 - any failure means: no GPU
        return 0


def _to_gpu(faiss: Any, index: Any) -> Any | None:
    """A GPU copy of a flat or IVF index, or None (no GPU, a CPU-only build, or an unsupported layout)."""
    if gpu_count(faiss) == 0:
        return None
    try:
        return faiss.index_cpu_to_all_gpus(index)
    except Exception:  # noqa: BLE001 - e.g. PQ sizes a GPU kernel lacks: the CPU index serves
        return None


def set_threads(threads: int | None) -> None:
    """Threads for FAISS (OpenMP) and torch; None leaves their defaults."""
    if threads is None:
        return
    torch.set_num_threads(threads)
    try:
        import_faiss().omp_set_num_threads(threads)
    except FaissMissing:
        pass


# ------------------------------------------------------------------------------------------
# Building, saving and loading an index


@dataclass
class CatalogIndex:
    """A FAISS index of a catalog's rows, with what index.json records about it."""

    catalog: Catalog
    index: Any  # a CPU faiss.Index: what is saved
    info: dict[str, Any]
    _gpu: Any = field(default=None, repr=False)
    _gpu_tried: bool = field(default=False, repr=False)

    @property
    def kind(self) -> str:
        return self.info["kind"]

    @property
    def params(self) -> dict[str, Any]:
        """Search-time values (ef_search, nprobe, rerank) may be changed here between searches."""
        return self.info["params"]

    def searchable(self) -> Any:
        """The index to search: a GPU copy for flat and ivfpq where FAISS sees a GPU, else the CPU one."""
        if not self._gpu_tried and self.kind in ("flat", "ivfpq"):
            self._gpu_tried = True
            self._gpu = _to_gpu(import_faiss(), self.index)
        return self._gpu if self._gpu is not None else self.index


Progress = Callable[[str], None]


def build_index(catalog: Catalog, kind: str = "auto", memory_budget: int | None = None, *,
                sample: int = 1000, seed: int = 0, threads: int | None = None,
                progress: Progress | None = None, **overrides: Any) -> CatalogIndex:
    """Builds a `kind` index (flat, hnsw, ivfpq or auto, see `plan_index`) of the catalog's rows.

    `overrides` replace the plan's parameters (M, ef_construction, ef_search; nlist, m, nprobe,
    rerank). With `sample` > 0, recall@10 against exact search is measured on that many of the
    catalog's own rows as queries (seeded; each row is its own nearest neighbour, and stays in
    the index: a sample tests the index, not the model) and recorded in index.json.
    """
    faiss = import_faiss()
    set_threads(threads)
    plan = plan_index(catalog.count, catalog.dim, kind, memory_budget)
    unknown = set(overrides) - set(plan.params)
    if unknown:
        raise CatalogError(f"{plan.kind}: unknown parameter(s) {', '.join(sorted(unknown))}; "
                           f"expected {', '.join(plan.params) or 'none'}")
    params = {**plan.params, **overrides}
    say = progress or (lambda text: None)
    start = time.perf_counter()
    if plan.kind == "flat":
        index = faiss.IndexFlatIP(catalog.dim)
    elif plan.kind == "hnsw":
        index = faiss.IndexHNSWFlat(catalog.dim, int(params["M"]), faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = int(params["ef_construction"])
    else:
        index = _trained_ivfpq(faiss, catalog, params, seed, say)
    _add_rows(index, catalog, plan.kind, say, start)
    seconds = time.perf_counter() - start
    info = {
        "format": INDEX_FORMAT, "format_version": INDEX_VERSION,
        "kind": plan.kind, "requested_kind": kind, "reason": plan.reason, "params": params,
        "fingerprint": catalog.fingerprint, "dim": catalog.dim, "count": catalog.count,
        "dtype": catalog.embeddings.dtype.name, "embeddings_digest": embeddings_digest(catalog.embeddings),
        "memory_budget": memory_budget, "estimated_bytes": plan.estimated_bytes,
        "build_seconds": round(seconds, 3), "threads": faiss.omp_get_max_threads(),
        "faiss_version": getattr(faiss, "__version__", "unknown"),
        "recall_at_10": None, "recall_sample": 0,
    }
    built = CatalogIndex(catalog, index, info)
    if sample > 0:
        say(f"measuring recall@{RECALL_K} on {min(sample, catalog.count)} rows against exact search")
        info["recall_at_10"] = round(self_recall(built, sample, seed), 4)
        info["recall_sample"] = min(sample, catalog.count)
    return built


def _float_rows(embeddings: np.ndarray, rows: Any) -> np.ndarray:
    return np.ascontiguousarray(embeddings[rows], dtype=np.float32)


def _trained_ivfpq(faiss: Any, catalog: Catalog, params: dict[str, Any], seed: int, say: Progress) -> Any:
    """An IndexIVFPQ (inner product) whose centroids and codebooks are trained on a seeded sample."""
    nlist, code = int(params["nlist"]), int(params["m"])
    if catalog.dim % code:
        raise CatalogError(f"ivfpq: m = {code} must divide the dimension {catalog.dim}")
    quantizer = faiss.IndexFlatIP(catalog.dim)
    index = faiss.IndexIVFPQ(quantizer, catalog.dim, nlist, code, int(params["nbits"]), faiss.METRIC_INNER_PRODUCT)
    # The sample is chosen here (IVF_TRAIN_PER_LIST rows per list, at least enough for the codebooks),
    # so FAISS's "too few points" warnings would only repeat a decision made on purpose.
    for clustering in (index.cp, index.pq.cp):
        clustering.niter = KMEANS_ITERATIONS
        clustering.min_points_per_centroid = 1
        clustering.seed = seed
    wanted = max(IVF_TRAIN_PER_LIST * nlist, IVF_TRAIN_PER_LIST * PQ_CENTROIDS)
    rows = np.sort(np.random.default_rng(seed).choice(catalog.count, min(wanted, catalog.count), replace=False))
    sample = _float_rows(catalog.embeddings, rows)
    say(f"training {nlist} lists and {code} x {PQ_CENTROIDS}-centroid codebooks on {len(rows)} rows")
    gpu = _to_gpu(faiss, index)
    if gpu is not None:
        try:  # k-means on the GPU, then the trained index back to the CPU for saving
            gpu.train(sample)
            return faiss.index_gpu_to_cpu(gpu)
        except Exception:  # noqa: BLE001 - fall back to the CPU
            pass
    index.train(sample)
    return index


def _add_rows(index: Any, catalog: Catalog, kind: str, say: Progress, start: float) -> None:
    """Adds every row in float32 chunks (float16 catalogs convert chunk by chunk), saying how far."""
    count, reported = catalog.count, 0.0
    for first in range(0, count, ADD_CHUNK_ROWS):
        index.add(_float_rows(catalog.embeddings, slice(first, first + ADD_CHUNK_ROWS)))
        done = min(first + ADD_CHUNK_ROWS, count)
        elapsed = time.perf_counter() - start
        if done == count or elapsed - reported >= 10:  # a line every 10 s at most
            reported = elapsed
            say(f"{kind}: {done}/{count} rows added ({100 * done / count:.0f}%, {elapsed:.0f} s)")


def save_index(built: CatalogIndex, out_dir: str | os.PathLike | None = None) -> tuple[Path, Path]:
    """Writes OUT/index.faiss, then OUT/index.json, each atomically (temporary file, os.replace).

    index.json records the size of index.faiss, so a reader that catches the two files from
    different builds refuses them instead of mixing them.
    """
    faiss = import_faiss()
    root = Path(out_dir) if out_dir is not None else built.catalog.root
    index_path, info_path = root / INDEX_FILE, root / INDEX_INFO_FILE
    with atomic_output(index_path) as tmp:
        faiss.write_index(built.index, str(tmp))
        size = tmp.stat().st_size
    built.info["index_bytes"] = size
    built.info["bytes_per_vector"] = round(size / built.catalog.count, 2)
    with atomic_output(info_path) as tmp:
        tmp.write_text(json.dumps(built.info, indent=2) + "\n", encoding="utf-8")
    return index_path, info_path


def index_exists(catalog: Catalog) -> bool:
    return (catalog.root / INDEX_FILE).exists() or (catalog.root / INDEX_INFO_FILE).exists()


def load_index(catalog: Catalog) -> CatalogIndex:
    """OUT/index.faiss and OUT/index.json, refused (IndexMismatch) unless they index this catalog's
    embeddings: the same fingerprint, dim, count and sampled rows."""
    info_path, index_path = catalog.root / INDEX_INFO_FILE, catalog.root / INDEX_FILE
    info = _read_index_info(info_path)
    rebuild = f"rebuild it with: python tools/index.py {catalog.root}"
    if info["fingerprint"] != catalog.fingerprint:
        raise IndexMismatch(f"{info_path}: built for embeddings of model fingerprint {info['fingerprint']}, "
                            f"the catalog's are {catalog.fingerprint}; {rebuild}")
    for key, have in (("dim", catalog.dim), ("count", catalog.count)):
        if info[key] != have:
            raise IndexMismatch(f"{info_path}: built for {key} {info[key]}, the catalog's embeddings have "
                                f"{have}; {rebuild}")
    if info.get("embeddings_digest") not in (None, embeddings_digest(catalog.embeddings)):
        raise IndexMismatch(f"{info_path}: built from other embeddings (same model, dim and count, other "
                            f"values); {rebuild}")
    if not index_path.is_file():
        raise CatalogError(f"{index_path}: missing, though {INDEX_INFO_FILE} is there; {rebuild}")
    if "index_bytes" in info and index_path.stat().st_size != info["index_bytes"]:
        raise CatalogError(f"{index_path}: {index_path.stat().st_size} bytes, {INDEX_INFO_FILE} says "
                           f"{info['index_bytes']} (the two files come from different builds); {rebuild}")
    faiss = import_faiss()
    try:
        index = faiss.read_index(str(index_path))
    except Exception as error:  # noqa: BLE001 - FAISS raises RuntimeError with a C++ trace
        raise CatalogError(f"{index_path}: cannot be read as a FAISS index ({_first_line(error)})") from None
    expected = {"flat": faiss.IndexFlat, "hnsw": faiss.IndexHNSWFlat, "ivfpq": faiss.IndexIVFPQ}[info["kind"]]
    if not isinstance(index, expected) or index.metric_type != faiss.METRIC_INNER_PRODUCT:
        raise CatalogError(f"{index_path}: a {type(index).__name__}, but {INDEX_INFO_FILE} says an "
                           f"inner-product {info['kind']} index; {rebuild}")
    if index.ntotal != catalog.count or index.d != catalog.dim:
        raise IndexMismatch(f"{index_path}: holds {index.ntotal} rows of {index.d} dimensions, the catalog "
                            f"{catalog.count} of {catalog.dim}; {rebuild}")
    return CatalogIndex(catalog, index, info)


def _read_index_info(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise CatalogError(f"{path}: missing; build the index with: python tools/index.py {path.parent}")
    info = read_json(path)
    if not isinstance(info, dict) or info.get("format") != INDEX_FORMAT:
        raise CatalogError(f"{path}: not an index description of tools/index.py (no format {INDEX_FORMAT!r})")
    if info.get("format_version") != INDEX_VERSION:
        raise CatalogError(f"{path}: format version {info.get('format_version')!r}, expected {INDEX_VERSION}")
    missing = [key for key in ("kind", "params", "fingerprint", "dim", "count") if key not in info]
    if missing or info["kind"] not in ("flat", "hnsw", "ivfpq") or not isinstance(info["params"], dict):
        raise CatalogError(f"{path}: expected kind (flat, hnsw or ivfpq), params, fingerprint, dim and count"
                           + (f"; missing {', '.join(missing)}" if missing else f"; kind is {info['kind']!r}"))
    return info


def open_searcher(catalog: Catalog) -> Catalog | CatalogIndex:
    """The catalog's index when one was built, else the catalog itself (exact search)."""
    return load_index(catalog) if index_exists(catalog) else catalog


# ------------------------------------------------------------------------------------------
# Search


def search_index(searcher: Catalog | CatalogIndex, queries: np.ndarray | torch.Tensor,
                 k: int) -> tuple[np.ndarray, np.ndarray]:
    """(Q, k') cosine scores (float32) and catalog row indices (int64), best first; k' = min(k, N).

    A Catalog is searched exactly (no FAISS needed); a CatalogIndex with its index. Queries are
    L2-normalised here. Equal scores are ordered by row, lowest first. An approximate index may
    find fewer than k' rows for a query: the missing places hold row -1 and score -inf.
    """
    catalog = searcher if isinstance(searcher, Catalog) else searcher.catalog
    queries = _unit_queries(queries, catalog.dim)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    k = min(k, catalog.count)
    if isinstance(searcher, Catalog):
        return exact_search(catalog.embeddings, queries, k)
    return _index_search(searcher, queries, k)


def _unit_queries(queries: np.ndarray | torch.Tensor, dim: int) -> np.ndarray:
    if isinstance(queries, torch.Tensor):
        queries = queries.detach().to("cpu", torch.float32).numpy()
    queries = np.asarray(queries, dtype=np.float32)
    if queries.ndim == 1:
        queries = queries[None]
    if queries.ndim != 2 or queries.shape[1] != dim:
        raise CatalogError(f"queries of shape {tuple(queries.shape)}: expected (Q, {dim}), the dimension of "
                           "the catalog's embeddings")
    if not np.isfinite(queries).all():
        raise CatalogError("queries hold a non-finite value (NaN or infinity)")
    norms = np.linalg.norm(queries, axis=1, keepdims=True)
    if (norms == 0).any():
        raise CatalogError(f"query {int(np.argmin(norms[:, 0]))} is all zeros: it has no direction to search")
    return np.ascontiguousarray(queries / norms, dtype=np.float32)


def exact_search(embeddings: np.ndarray, queries: np.ndarray, k: int, block_rows: int = SCAN_CHUNK_ROWS,
                 query_chunk: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k inner products, equal scores by lowest row. The rows are read block by block
    (a memory-mapped catalog larger than RAM is fine); memory is O(query_chunk x block_rows)."""
    k = min(k, embeddings.shape[0])
    q = torch.from_numpy(np.ascontiguousarray(queries, dtype=np.float32))
    best_scores = torch.empty((q.shape[0], 0))
    best_rows = torch.empty((q.shape[0], 0), dtype=torch.int64)
    for start in range(0, embeddings.shape[0], block_rows):
        block = _read_only_tensor(_float_rows(embeddings, slice(start, start + block_rows)))
        chunk_scores, chunk_rows = [], []
        for first in range(0, q.shape[0], query_chunk):
            scores, rows = _block_top_k(q[first:first + query_chunk] @ block.T, k)
            chunk_scores.append(scores)
            chunk_rows.append(rows + start)
        best_scores, best_rows = _merge(torch.cat([best_scores, torch.cat(chunk_scores)], 1),
                                        torch.cat([best_rows, torch.cat(chunk_rows)], 1), k)
    return best_scores.numpy(), best_rows.numpy()


def _read_only_tensor(array: np.ndarray) -> torch.Tensor:
    """A tensor sharing a read-only array (a float32 memory map's block), which is only read:
    torch warns that it cannot mark such a tensor read-only, and copying every block to
    silence it would cost more than the search."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(array)


def _block_top_k(similarity: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """topk of each row, with the k-th place's ties resolved to the lowest columns.

    torch.topk keeps an arbitrary subset of equal values at the k-th place; the rare rows where a
    tie crosses that boundary are redone with a stable sort of every value >= the k-th.
    """
    k = min(k, similarity.shape[1])
    scores, columns = similarity.topk(k, dim=1)
    kth = scores[:, -1:]
    crossing = ((similarity == kth).sum(1) > (scores == kth).sum(1)).nonzero().flatten()
    for row in crossing.tolist():
        candidates = (similarity[row] >= kth[row]).nonzero().flatten()  # ascending columns
        order = torch.sort(similarity[row, candidates], descending=True, stable=True).indices[:k]
        scores[row], columns[row] = similarity[row, candidates[order]], candidates[order]
    return scores, columns


def _merge(scores: torch.Tensor, rows: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k best of each row of candidates, by score descending, then row ascending."""
    by_row = torch.argsort(rows, dim=1, stable=True)
    scores, rows = scores.gather(1, by_row), rows.gather(1, by_row)
    by_score = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k]
    return scores.gather(1, by_score), rows.gather(1, by_score)


def _index_search(built: CatalogIndex, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    faiss = import_faiss()
    index, params = built.searchable(), built.params
    wanted = k
    if built.kind == "hnsw":
        index.hnsw.efSearch = max(int(params["ef_search"]), k)
    elif built.kind == "ivfpq":
        try:
            faiss.extract_index_ivf(index).nprobe = int(params["nprobe"])
        except Exception:  # noqa: BLE001 - a GPU index takes nprobe on itself
            index.nprobe = int(params["nprobe"])
        wanted = min(built.catalog.count, k * max(1, int(params.get("rerank") or 1)))
    scores, rows = index.search(queries, wanted)
    scores[rows < 0] = -np.inf
    if built.kind == "ivfpq" and params.get("rerank"):
        scores = _exact_scores(built.catalog.embeddings, queries, rows)
    merged = _merge(torch.from_numpy(scores), torch.from_numpy(rows.astype(np.int64)), k)
    return merged[0].numpy(), merged[1].numpy()


def _exact_scores(embeddings: np.ndarray, queries: np.ndarray, rows: np.ndarray, chunk: int = 256) -> np.ndarray:
    """Cosine of each query with each of its candidate rows (-1: -inf), read from the embeddings.

    Only the candidates are read, in row order, from the memory-mapped file: a page-cache hit for
    a catalog that fits in RAM, a few random reads per query otherwise.
    """
    scores = np.full(rows.shape, -np.inf, dtype=np.float32)
    for first in range(0, rows.shape[0], chunk):
        block = rows[first:first + chunk]
        valid = block >= 0
        unique, inverse = np.unique(block[valid], return_inverse=True)
        vectors = _float_rows(embeddings, unique)[inverse]  # (valid candidates, D)
        owner = np.nonzero(valid)[0] + first  # each candidate's query
        block_scores = scores[first:first + chunk]
        block_scores[valid] = np.einsum("cd,cd->c", vectors, queries[owner])
    return scores


def recall_at(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean over queries of |found ∩ truth| / k, both (Q, k) row indices."""
    k = truth.shape[1]
    hits = sum(len(set(f.tolist()) & set(t.tolist())) for f, t in zip(found[:, :k], truth))
    return hits / (truth.shape[0] * k)


def sample_rows(count: int, sample: int, seed: int = 0) -> np.ndarray:
    return np.sort(np.random.default_rng(seed).choice(count, min(sample, count), replace=False))


def self_recall(built: CatalogIndex, sample: int = 1000, seed: int = 0) -> float:
    """recall@10 of the index against exact search, the queries being `sample` of the catalog's
    own rows (seeded). Nothing is excluded: each query finds itself, in both result lists."""
    queries = _float_rows(built.catalog.embeddings, sample_rows(built.catalog.count, sample, seed))
    k = min(RECALL_K, built.catalog.count)
    _, truth = search_index(built.catalog, queries, k)
    _, found = search_index(built, queries, k)
    return recall_at(found, truth)
