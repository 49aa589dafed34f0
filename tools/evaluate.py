"""Recall@K and mAP@K of a trained model on an In-Shop query / gallery split.

    python tools/evaluate.py runs/demo/snapshot.pt [--data_root R] [--recall_at 1 5 10]
        [--map_at 10] [--batch_size N] [--out metrics.json] [--rerank {none,qe,kr}]
    python tools/evaluate.py model.torchscript.pt --data_root data/inshop
    python tools/evaluate.py --mmpretrain resnet50-arcface_inshop.pth --arch resnet50 \\
        --num_classes 3997 --data_root data/inshop
    torchrun --nproc_per_node=4 tools/evaluate.py runs/demo/snapshot.pt      # same numbers, faster
    python tools/evaluate.py runs/demo/snapshot.pt --rerank qe [--qe_k 2 --qe_alpha 3]
    python tools/evaluate.py runs/demo/snapshot.pt --index hnsw       # ranked through a FAISS index

The data root defaults to the data the snapshot was trained on, K and the batch size to its
configuration, and the preprocessing (sizes, normalisation, interpolation) to what it records, so
the numbers equal the trainer's last evaluation.
Under torchrun every process embeds its share; the result is identical for any world size.
Re-ranking (--rerank qe or kr, arcface/rerank.py) runs on rank 0 on the gathered embeddings, so
it is identical for any world size too. --index KIND ranks the gallery through a FAISS index of
that kind (tools/catalog.py: flat, hnsw, ivfpq or auto) built on rank 0 from the gallery
embeddings, as a catalog would be searched; flat gives the exact numbers.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from arcface.inshop import InShop
from arcface.metrics import ranking_metrics
from arcface.rerank import Rerank
from arcface.retrieval import embed_loader, evaluate_retrieval, prepare_eval_loader
from arcface.transforms import MAX_IMAGE_PIXELS
from support import runtime
from tools.catalog import KINDS, Catalog, build_index, search_index
from tools.common import (
    TOOL_ERRORS,
    LoadedModel,
    add_max_pixels_arg,
    add_model_args,
    add_rerank_args,
    check_max_pixels_arg,
    check_rerank_args,
    default_data_root,
    metadata_of,
    model_from_args,
    rerank_from_args,
    run_cli,
    training_config,
    write_json,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(parser)
    parser.add_argument("--data_root", default=None,
                        help="In-Shop root (Eval/list_eval_partition.txt, Img/); default: the training data")
    parser.add_argument("--recall_at", type=int, nargs="+", default=None, help="default: the training config's")
    parser.add_argument("--map_at", type=int, nargs="+", default=None, help="default: the training config's")
    parser.add_argument("--ap_mode", choices=("IR", "integrate"), default=None)
    parser.add_argument("--batch_size", type=int, default=None, help="images per process and batch")
    parser.add_argument("--num_workers", type=int, default=None, help="loader processes per process")
    parser.add_argument("--device", default="auto", choices=("auto", "cuda", "mps", "cpu"))
    parser.add_argument("--amp", default=None, choices=("auto", "bf16", "fp16", "off"),
                        help="autocast dtype; default: the training config's (float32 on a CPU)")
    parser.add_argument("--out", default=None, help="also write the metrics to this JSON file")
    parser.add_argument("--index", default=None, choices=KINDS, metavar="KIND",
                        help="rank the gallery through a FAISS index of this kind (flat, hnsw, ivfpq, auto; "
                             "tools/catalog.py) instead of exact search; flat gives the exact numbers")
    add_max_pixels_arg(parser)
    add_rerank_args(parser)
    args = parser.parse_args(argv)
    check_max_pixels_arg(parser, args)
    check_rerank_args(parser, args)
    if args.index is not None and args.rerank != "none":
        parser.error("--index and --rerank: re-ranking reads every gallery vector, not an index; give one of them")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with process_group(args.device) as device:
        model = model_from_args(args)
        settings = evaluation_settings(args, model)
        data_root = Path(args.data_root) if args.data_root else default_data_root(model)
        metrics = evaluate(model, data_root, device, **settings, max_pixels=args.max_image_pixels,
                           rerank=rerank_from_args(args), index=args.index)
        if runtime.is_main_process():
            report = {**metadata_of(model), "data_root": str(data_root), **metrics}
            print(format_metrics(report))
            if args.out:
                write_json(report, args.out)
                print(f"written to {args.out}")
    return 0


def evaluation_settings(args: argparse.Namespace, model: LoadedModel) -> dict[str, Any]:
    """Flags where given, else the training configuration (the trainer's own evaluation), else defaults."""
    cfg = training_config(model.config, Path(model.source)) if model.config else None
    return {
        "recall_at": tuple(args.recall_at or (cfg.recall_at if cfg else (1, 5, 10))),
        "map_at": tuple(args.map_at or (cfg.map_at if cfg else (10,))),
        "ap_mode": args.ap_mode or (cfg.ap_mode if cfg else "IR"),
        "batch_size": args.batch_size or (cfg.eval_batch_size if cfg else 64),
        "num_workers": args.num_workers if args.num_workers is not None else (cfg.num_workers if cfg else 4),
        "amp": args.amp or (cfg.amp if cfg else "off"),
        "channels_last": cfg.channels_last if cfg else False,
    }


def evaluate(model: LoadedModel, data_root: Path, device: torch.device, recall_at: tuple[int, ...] = (1,),
             map_at: tuple[int, ...] = (10,), ap_mode: str = "IR", batch_size: int = 64,
             num_workers: int = 0, amp: str = "off", channels_last: bool = False,
             max_pixels: int = MAX_IMAGE_PIXELS, rerank: Rerank | None = None,
             index: str | None = None) -> dict[str, Any]:
    """Query split against gallery split of `data_root`; the same dict on every process.

    With a `rerank` other than "none" the dict also says which ({"rerank": {"method", ...}}); with
    an `index` kind, the ranking comes from that FAISS index ({"index": {"kind", "params"}}).
    """
    transform = model.preprocess.transform()
    query_set = InShop(data_root, "query", transform=transform, max_pixels=max_pixels)
    gallery_set = InShop(data_root, "gallery", transform=transform, max_pixels=max_pixels)
    module = model.module.to(device)
    if index is not None:
        def embed(dataset: InShop) -> Tensor:
            loader = prepare_eval_loader(dataset, batch_size, device, num_workers)
            return embed_loader(module, loader, device, runtime.autocast_dtype(amp, device), channels_last,
                                progress=runtime.is_main_process())

        query, gallery = embed(query_set), embed(gallery_set)  # gathered: every rank holds all of them
        metrics = runtime.one_rank_decides(lambda: index_metrics(
            query, gallery, query_set.labels, gallery_set.labels, index, recall_at, map_at, ap_mode,
            model.fingerprint), TOOL_ERRORS, device)
        return {**metrics, "num_gallery": len(gallery_set)}
    metrics = evaluate_retrieval(
        module, query_set, gallery_set, batch_size=batch_size, device=device, recall_at=recall_at,
        map_at=map_at, ap_mode=ap_mode, num_workers=num_workers,
        autocast_dtype=runtime.autocast_dtype(amp, device), channels_last=channels_last,
        progress=runtime.is_main_process(), rerank=rerank,
    )
    if rerank is not None and rerank.method != "none":
        metrics["rerank"] = rerank.describe()
    return {**metrics, "num_gallery": len(gallery_set)}


def index_metrics(query: Tensor, gallery: Tensor, query_labels: Tensor, gallery_labels: Tensor, kind: str = "flat",
                  recall_at: Sequence[int] = (1,), map_at: Sequence[int] = (10,), ap_mode: str = "IR",
                  fingerprint: str = "evaluation", threads: int | None = None, **params: Any) -> dict[str, Any]:
    """retrieval_metrics' numbers, the ranking coming from a `kind` FAISS index of the gallery.

    The gallery becomes a catalog in a temporary folder (unit rows, as tools/embed.py writes
    them), indexed as tools/index.py would (no recall sample), and the queries are searched with
    catalog.search_index for the top max(K) rows; arcface.metrics.ranking_metrics scores them.
    `params` override the kind's defaults (ef_search, nprobe, ...; tools/catalog.build_index).
    """
    k = min(max((*recall_at, *map_at)), gallery.shape[0])
    with tempfile.TemporaryDirectory(prefix="evaluate_index_") as folder:
        catalog = Catalog.from_array(F.normalize(gallery.float(), dim=1).numpy(), folder, fingerprint)
        built = build_index(catalog, kind, sample=0, threads=threads, **params)
        _, rows = search_index(built, query, k)
    ranked, labels = _missing_as_misses(torch.from_numpy(rows), query_labels, gallery_labels,
                                        min(max((*recall_at, *map_at)), gallery.shape[0] + 1))
    metrics = ranking_metrics(ranked, query_labels, labels, recall_at, map_at, ap_mode)
    return {**metrics, "index": {"kind": built.kind, "params": dict(built.params)}}


def _missing_as_misses(ranked: Tensor, query_labels: Tensor, gallery_labels: Tensor,
                       columns: int) -> tuple[Tensor, Tensor]:
    """Places an approximate index left empty (row -1) point to one extra gallery item whose label
    no query has: they count as misses, and the number of relevant items is unchanged."""
    absent = torch.minimum(query_labels.min(), gallery_labels.min()) - 1
    labels = torch.cat([gallery_labels, absent.view(1)])
    extra = len(gallery_labels)
    ranked = torch.where(ranked < 0, torch.full_like(ranked, extra), ranked)
    if ranked.shape[1] < columns:  # K above the gallery size: ranking_metrics wants one more column
        ranked = torch.cat([ranked, torch.full((ranked.shape[0], columns - ranked.shape[1]), extra)], 1)
    return ranked, labels


@contextlib.contextmanager
def process_group(requested_device: str) -> Iterator[torch.device]:
    """Under torchrun (WORLD_SIZE set) a process group on this process's device; else just the device."""
    device = runtime.pick_device(requested_device, runtime.local_rank())
    if "WORLD_SIZE" not in os.environ:
        yield device
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend=runtime.backend_for(device))
    try:
        yield device
    finally:
        dist.destroy_process_group()


def format_metrics(report: dict[str, Any]) -> str:
    scores = " | ".join(f"{key} {value:.2f}" for key, value in report.items() if "@" in key)
    reranked = ""
    if "rerank" in report:
        settings = ", ".join(f"{key} {value}" for key, value in report["rerank"].items() if key != "method")
        reranked = f" | re-ranked: {report['rerank']['method']} ({settings})"
    if "index" in report:
        settings = ", ".join(f"{key} {value}" for key, value in report["index"]["params"].items())
        reranked += f" | through a {report['index']['kind']} index" + (f" ({settings})" if settings else "")
    return (f"{report['model']} on {report['data_root']}\n"
            f"{report['num_queries']} queries, {report['num_gallery']} gallery images{reranked} | {scores}")


if __name__ == "__main__":
    sys.exit(run_cli(main))
