"""Build a FAISS index beside a catalog's embeddings (a folder written by tools/embed.py).

    python tools/index.py OUT                                  # --kind auto, no memory budget
    python tools/index.py OUT --kind hnsw --threads 2
    python tools/index.py OUT --kind auto --memory_budget 2GiB --sample 1000

Writes OUT/index.faiss and OUT/index.json (each to a temporary file moved into place) and prints
the kind and its parameters, bytes per vector, build time and recall@10 against exact search.
The recall queries are --sample of the catalog's own rows, seeded; nothing is excluded, so each
query finds itself in both lists (the figure tests the index, not the model). --sample 0 skips it.
auto picks flat, hnsw or ivfpq from the rows, dimensions and --memory_budget (the budget of the
index in memory; the embeddings stay on disk); the rule is in tools/catalog.py and docs/CATALOG.md.
FAISS is an optional extra: pip install faiss-cpu.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tools.catalog import (KINDS, CatalogError, FaissMissing, build_index, format_bytes, parse_bytes,
                           read_catalog, save_index)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", metavar="OUT", help="catalog folder: embeddings.npy, paths.txt, meta.json")
    parser.add_argument("--kind", choices=KINDS, default="auto",
                        help="flat: exact; hnsw: graph; ivfpq: compressed codes; auto: chosen from the "
                             "size and --memory_budget (default)")
    parser.add_argument("--memory_budget", default=None, metavar="SIZE",
                        help="memory the index may take, e.g. 2GiB, 512MiB, 1.5GB; steers auto and sets "
                             "ivfpq's code size (default: no limit)")
    parser.add_argument("--sample", type=int, default=1000, metavar="N",
                        help="catalog rows used as queries to measure recall@10 against exact search; "
                             "0 skips it (default 1000)")
    parser.add_argument("--threads", type=int, default=None, metavar="N",
                        help="threads for building and searching (default: FAISS's and torch's own)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the training and recall samples")
    args = parser.parse_args(argv)
    if args.memory_budget is not None:
        try:
            args.memory_budget = parse_bytes(args.memory_budget)
        except ValueError as error:
            parser.error(f"--memory_budget: {error}")
    if args.sample < 0:
        parser.error(f"--sample: expected an integer >= 0, got {args.sample}")
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads: expected an integer >= 1, got {args.threads}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    catalog = read_catalog(args.out)
    embeddings = catalog.embeddings
    print(f"catalog {catalog.root}: {catalog.count} rows x {catalog.dim} {embeddings.dtype.name}, "
          f"fingerprint {catalog.fingerprint}", flush=True)
    built = build_index(catalog, args.kind, args.memory_budget, sample=args.sample, seed=args.seed,
                        threads=args.threads, progress=lambda text: print(f"  {text}", flush=True))
    index_path, info_path = save_index(built)
    info = built.info
    params = ", ".join(f"{key} {value}" for key, value in info["params"].items()) or "no parameters"
    chosen = f" (auto: {info['reason']})" if args.kind == "auto" else ""
    print(f"kind {info['kind']}{chosen}: {params}")
    print(f"{info['bytes_per_vector']:.1f} bytes per vector ({format_bytes(info['index_bytes'])}), "
          f"built in {info['build_seconds']:.1f} s on {info['threads']} thread(s)")
    if info["recall_at_10"] is not None:
        print(f"recall@10 {info['recall_at_10']:.4f} against exact search, {info['recall_sample']} of the "
              "catalog's rows as queries (each finds itself)")
    print(f"wrote {index_path} and {info_path}")
    return 0


def run(argv: list[str] | None = None) -> int:
    """main, with bad input said in one `error: ...` line and exit status 1 (bad flags: 2, by argparse)."""
    try:
        return main(argv)
    except (CatalogError, FaissMissing, OSError) as error:
        lines = str(error).strip().splitlines()
        print(f"error: {lines[0] if lines else type(error).__name__}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(run())
