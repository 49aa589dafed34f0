"""What the retrieval tools share: loading a model, listing images, fingerprints, atomic outputs.

A model comes from one of three files, and every tool accepts all three:

    runs/demo/snapshot.pt                       a training snapshot (snapshot.py)
    model.torchscript.pt                        an export of tools/export.py
    --mmpretrain FILE --arch resnet50 --num_classes 3997    an mmpretrain ArcFace checkpoint

Each becomes a `LoadedModel`: an `Embedder` (backbone -> pooling -> optional embedding layer,
no ArcFace head), the preprocessing it expects, and a fingerprint of its weights.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import warnings
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from arcface.inshop import PARTITION_FILE, InShop
from arcface.model import (MMPRETRAIN_FAMILIES, RetrievalModel, build_model, family_of, fit_position_embedding,
                           load_mmpretrain_retriever)
from arcface.rerank import KR_K1, KR_K2, KR_LAMBDA, QE_ALPHA, QE_K, RERANK_METHODS, Rerank
from arcface.transforms import MAX_IMAGE_PIXELS, MEAN_RGB, STD_RGB, check_max_pixels, load_image, test_transform
from config import Config
from runtime import UserError, user_message
from snapshot import SnapshotError, atomic_output, load_snapshot
from tools.catalog import IndexMismatch  # noqa: F401 - the tools' one mismatch error, re-exported here

EXPORT_METADATA_FILE = "retrieval.json"  # TorchScript extra file written by tools/export.py
EXPORT_FORMAT = "arcface-retrieval-embedder"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
# The reference recipe's test pipeline: what mmpretrain's In-Shop checkpoints were evaluated with.
MMPRETRAIN_RESIZE, MMPRETRAIN_CROP = 512, 448


class Embedder(nn.Module):
    """The retrieval part of a RetrievalModel: (N, 3, H, W) normalised images -> (N, D) embeddings.

    Shares the model's modules, so its state-dict keys are the model's minus `head.*`.
    """

    def __init__(self, model: RetrievalModel) -> None:
        super().__init__()
        self.backbone = model.backbone
        self.neck = model.neck
        self.embedding = model.embedding

    def forward(self, images: Tensor) -> Tensor:
        return self.embedding(self.neck(self.backbone(images)))


@dataclass(frozen=True)
class Preprocess:
    """Test-time pipeline: resize to (resize, resize), centre crop (crop, crop), normalise RGB."""

    resize: int
    crop: int
    mean: tuple[float, ...] = MEAN_RGB  # 0-255 scale
    std: tuple[float, ...] = STD_RGB

    def transform(self) -> Callable[[Tensor], Tensor]:
        if tuple(self.mean) != MEAN_RGB or tuple(self.std) != STD_RGB:
            raise ValueError(
                f"the model expects normalisation mean={list(self.mean)} std={list(self.std)}, "
                f"but this project's pipeline uses mean={list(MEAN_RGB)} std={list(STD_RGB)}"
            )
        return test_transform(self.resize, self.crop)

    def as_dict(self) -> dict[str, Any]:
        return {"resize": self.resize, "crop": self.crop, "mean": list(self.mean), "std": list(self.std)}


@dataclass
class LoadedModel:
    module: nn.Module  # images -> embeddings (an Embedder or a TorchScript module)
    preprocess: Preprocess
    fingerprint: str  # changes whenever the weights or the preprocessing change
    source: str  # what was loaded, for messages and result files
    config: dict[str, Any] | None  # the training configuration, when the file records it


# ------------------------------------------------------------------------------------------
# Command-line arguments shared by the tools


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """MODEL positional (snapshot or TorchScript export) or --mmpretrain with its architecture."""
    parser.add_argument("model", nargs="?", default=None,
                        help="training snapshot (snapshot.pt) or TorchScript export (tools/export.py)")
    group = parser.add_argument_group("mmpretrain checkpoints (instead of MODEL)")
    group.add_argument("--mmpretrain", default=None, metavar="CHECKPOINT",
                       help="an mmpretrain ArcFace checkpoint, e.g. the published In-Shop ResNet-50")
    group.add_argument("--arch", default=None,
                       help="its ResNet, e.g. resnet50 (required with --mmpretrain; snapshots and exports "
                            "record theirs)")
    group.add_argument("--num_classes", type=int, default=None,
                       help="classes of its ArcFace head, 3997 for In-Shop (required with --mmpretrain)")
    group.add_argument("--sub_centers", type=int, default=1)
    group.add_argument("--pooling", default="avg", choices=("avg", "gem"))
    parser.add_argument("--resize", type=int, default=None,
                        help="override the model's test resize (mmpretrain default: 512)")
    parser.add_argument("--crop", type=int, default=None,
                        help="override the model's test crop (mmpretrain default: 448)")


def add_max_pixels_arg(parser: argparse.ArgumentParser) -> None:
    """--max_image_pixels: images whose header claims more pixels are refused before decoding."""
    parser.add_argument("--max_image_pixels", type=int, default=MAX_IMAGE_PIXELS, metavar="N",
                        help="refuse, before decoding, an image whose header claims more pixels "
                             f"(default {MAX_IMAGE_PIXELS}, as PIL's own limit)")


def check_max_pixels_arg(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    try:
        check_max_pixels(args.max_image_pixels)
    except ValueError:
        parser.error(f"--max_image_pixels: expected an integer >= 1, got {args.max_image_pixels}")


def add_rerank_args(parser: argparse.ArgumentParser) -> None:
    """--rerank {none,qe,kr} and the parameters of each method (arcface/rerank.py)."""
    group = parser.add_argument_group("re-ranking (arcface/rerank.py; docs/TOOLS.md)")
    group.add_argument("--rerank", choices=RERANK_METHODS, default="none",
                       help="none: cosine ranking (default); qe: alpha query expansion with database-side "
                            "augmentation; kr: k-reciprocal re-ranking (Zhong et al. 2017)")
    group.add_argument("--qe_k", type=int, default=QE_K, metavar="K",
                       help=f"qe: nearest gallery vectors averaged into each gallery vector and each query "
                            f"(default {QE_K})")
    group.add_argument("--qe_alpha", type=float, default=QE_ALPHA, metavar="A",
                       help=f"qe: neighbour weight max(cos, 0) ** A; 0 weighs them evenly (default {QE_ALPHA:g})")
    group.add_argument("--kr_k1", type=int, default=KR_K1, metavar="K1",
                       help=f"kr: neighbourhood size of the k-reciprocal sets (default {KR_K1})")
    group.add_argument("--kr_k2", type=int, default=KR_K2, metavar="K2",
                       help=f"kr: neighbours averaged in the local query expansion; 1 turns it off (default {KR_K2})")
    group.add_argument("--kr_lambda", type=float, default=KR_LAMBDA, metavar="L",
                       help=f"kr: weight of the cosine distance against the Jaccard distance, in [0, 1]; "
                            f"1 is plain cosine ranking (default {KR_LAMBDA:g})")


def check_rerank_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    try:
        rerank_from_args(args)
    except ValueError as error:  # "rerank: qe_k must be ..." -> "--qe_k must be ..."
        parser.error("--" + str(error).removeprefix("rerank: "))


def rerank_from_args(args: argparse.Namespace) -> Rerank:
    return Rerank(args.rerank, qe_k=args.qe_k, qe_alpha=args.qe_alpha, kr_k1=args.kr_k1, kr_k2=args.kr_k2,
                  kr_lambda=args.kr_lambda)


def model_from_args(args: argparse.Namespace) -> LoadedModel:
    if args.mmpretrain is not None:
        if args.model is not None:
            raise ValueError(f"give either MODEL ({args.model}) or --mmpretrain, not both")
        missing = [flag for flag, value in (("--arch", args.arch), ("--num_classes", args.num_classes))
                   if value is None]
        if missing:
            raise ValueError(f"--mmpretrain {args.mmpretrain}: also needs {' and '.join(missing)} "
                             "(the published In-Shop model: --arch resnet50 --num_classes 3997)")
        return load_mmpretrain(args.mmpretrain, args.arch, args.num_classes, args.sub_centers,
                               args.pooling, args.resize, args.crop)
    if args.model is None:
        raise ValueError("expected a MODEL file (a training snapshot or a TorchScript export) "
                         "or --mmpretrain CHECKPOINT --arch ARCH --num_classes N")
    return load_model(args.model, args.resize, args.crop)


def run_cli(main: Callable[[list[str] | None], int]) -> int:
    """Runs a tool's main; bad input ends with one `error: ...` line and exit status 1.

    Catalog and index errors (tools/catalog.py) are ValueErrors or ImportErrors, so they end
    the same way.
    """
    try:
        return main(None)
    except (OSError, ValueError, ImportError, SnapshotError) as error:
        print(f"error: {user_message(error)}", file=sys.stderr)
        return 1


# ------------------------------------------------------------------------------------------
# Loading models


def load_model(path: str | os.PathLike, resize: int | None = None, crop: int | None = None) -> LoadedModel:
    """A training snapshot, a TorchScript export or a torch.export archive -> LoadedModel (CPU, eval mode)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: no such model file; expected a training snapshot (<out_dir>/snapshot.pt) "
            "or an export of tools/export.py (TorchScript or torch.export)"
        )
    if is_torchscript(path):
        return load_torchscript(path, resize, crop)
    if is_exported_program(path):
        return load_exported_program(path, resize, crop)
    return load_training_snapshot(path, resize, crop)


def is_exported_program(path: Path) -> bool:
    """torch.export.save archives hold `<name>/models/model.json` (the serialised graph)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.split("/", 1)[-1] == "models/model.json" for name in archive.namelist())


def is_torchscript(path: Path) -> bool:
    """TorchScript archives carry compiled code (`code/`, `constants.pkl`); torch.save files do not."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("/constants.pkl") for name in archive.namelist())


def load_training_snapshot(path: Path, resize: int | None = None, crop: int | None = None) -> LoadedModel:
    try:
        snapshot = load_snapshot(path)
    except SnapshotError as error:
        raise SnapshotError(
            f"{error}. Expected a training snapshot or a TorchScript export; for an mmpretrain "
            "checkpoint use --mmpretrain FILE --arch ARCH --num_classes N"
        ) from None
    cfg = training_config(snapshot["config"], path)
    preprocess = Preprocess(resize or cfg.resize, crop or cfg.crop)
    # The ArcFace scale and margins only shape training logits: embeddings do not depend on them.
    # A ViT is built for the crop it will see; its position embeddings, made for the training
    # crop, are interpolated when --crop asks for another.
    model = build_model(num_classes=snapshot["num_classes"], arch=cfg.arch, pooling=cfg.pooling,
                        embedding_dim=cfg.embedding_dim or None, sub_centers=cfg.sub_centers,
                        image_size=preprocess.crop)
    prefix = "backbone."
    state = {key: fit_position_embedding(model.backbone, key.removeprefix(prefix), tensor, str(path))
             if key.startswith(prefix) else tensor for key, tensor in snapshot["model"].items()}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise SnapshotError(f"{path}: the weights do not fit the model its config describes: {error}") from None
    embedder = Embedder(model).eval()
    return LoadedModel(embedder, preprocess, fingerprint(embedder.state_dict(), preprocess),
                       f"snapshot {path} (epoch {snapshot['epochs_run']})", snapshot["config"])


def training_config(values: dict[str, Any], path: Path) -> Config:
    """A snapshot's config dict -> Config; fields this version does not know are left out."""
    known = {f.name for f in fields(Config)}
    kept = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items() if k in known}
    try:
        return Config(**kept)
    except ValueError as error:
        raise SnapshotError(f"{path}: its config is not valid here: {error}") from None


def load_mmpretrain(path: str | os.PathLike, arch: str, num_classes: int, sub_centers: int = 1,
                    pooling: str = "avg", resize: int | None = None, crop: int | None = None) -> LoadedModel:
    """An mmpretrain ArcFace checkpoint (classifier or retriever layout) -> LoadedModel."""
    if num_classes < 1 or sub_centers < 1:
        raise ValueError(f"--num_classes and --sub_centers: expected integers >= 1, "
                         f"got {num_classes} and {sub_centers}")
    if family_of(arch) not in MMPRETRAIN_FAMILIES:
        raise ValueError(f"--arch {arch}: --mmpretrain loads ResNet checkpoints only (mmpretrain's ResNet "
                         "layout is torchvision's, its other backbones' are not)")
    preprocess = Preprocess(resize or MMPRETRAIN_RESIZE, crop or MMPRETRAIN_CROP)
    model = build_model(num_classes=num_classes, arch=arch, pooling=pooling, sub_centers=sub_centers,
                        image_size=preprocess.crop)
    load_mmpretrain_retriever(model, path)
    embedder = Embedder(model).eval()
    return LoadedModel(embedder, preprocess, fingerprint(embedder.state_dict(), preprocess),
                       f"mmpretrain {path} ({arch}, {num_classes} classes)", None)


def load_torchscript(path: Path, resize: int | None = None, crop: int | None = None) -> LoadedModel:
    """An export of tools/export.py. A TorchScript file is a program, not only weights: load trusted files only."""
    extra = {EXPORT_METADATA_FILE: ""}
    with warnings.catch_warnings():
        # torch >= 2.9 marks TorchScript deprecated, yet it is what C++ (libtorch) deployments load.
        warnings.simplefilter("ignore", FutureWarning)
        module = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    metadata = _export_metadata(path, extra[EXPORT_METADATA_FILE], "TorchScript file")
    preprocess = Preprocess(resize or metadata["resize"], crop or metadata["crop"],
                            tuple(metadata["mean"]), tuple(metadata["std"]))
    module.eval()
    return LoadedModel(module, preprocess, fingerprint(module.state_dict(), preprocess),
                       f"TorchScript {path}", metadata.get("config"))


class ExportedEmbedder(nn.Module):
    """The module of a torch.export ExportedProgram. It was exported in eval mode and cannot be
    switched (its graph has no train mode), so train()/eval() leave it as it is."""

    def __init__(self, program: torch.export.ExportedProgram) -> None:
        super().__init__()
        self.graph = program.module()

    def forward(self, images: Tensor) -> Tensor:
        return self.graph(images)

    def train(self, mode: bool = True) -> ExportedEmbedder:
        return self

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        return self.graph.state_dict(*args, **kwargs)  # the embedder's own key names


def load_exported_program(path: Path, resize: int | None = None, crop: int | None = None) -> LoadedModel:
    """A torch.export archive of tools/export.py. Like TorchScript, it is a program: trusted files only."""
    extra = {EXPORT_METADATA_FILE: ""}
    program = torch.export.load(str(path), extra_files=extra)
    metadata = _export_metadata(path, extra[EXPORT_METADATA_FILE], "torch.export archive")
    preprocess = Preprocess(resize or metadata["resize"], crop or metadata["crop"],
                            tuple(metadata["mean"]), tuple(metadata["std"]))
    module = ExportedEmbedder(program)
    return LoadedModel(module, preprocess, fingerprint(module.state_dict(), preprocess),
                       f"ExportedProgram {path}", metadata.get("config"))


def _export_metadata(path: Path, text: str, kind: str) -> dict[str, Any]:
    if not text:
        raise ValueError(f"{path}: a {kind} without {EXPORT_METADATA_FILE}; "
                         "expected an export of tools/export.py (it records the input size)")
    metadata = json.loads(text)
    if metadata.get("format") != EXPORT_FORMAT:
        raise ValueError(f"{path}: {EXPORT_METADATA_FILE} has format {metadata.get('format')!r}, "
                         f"expected {EXPORT_FORMAT!r}")
    return metadata


def fingerprint(state: dict[str, Tensor], preprocess: Preprocess) -> str:
    """sha256 of the embedding weights (names, dtypes, shapes, bytes) and the preprocessing.

    Computed from weights, not file bytes, so a snapshot and its TorchScript export agree, while
    continued training (other weights) or another input size gives another fingerprint.
    """
    digest = hashlib.sha256()
    for key in sorted(state):
        if key.startswith("head."):
            continue
        tensor = state[key].detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"{key}|{tensor.dtype}|{tuple(state[key].shape)}|".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes())
    digest.update(json.dumps(preprocess.as_dict(), sort_keys=True).encode())
    return digest.hexdigest()[:16]


def default_data_root(model: LoadedModel) -> Path:
    """The In-Shop root the model was trained on: its data_root, or its synthetic set."""
    if model.config is None:
        raise ValueError(f"{model.source} does not record its training data: pass --data_root "
                         "(an In-Shop root holding Eval/list_eval_partition.txt)")
    from datautils import synthetic_root  # generates the synthetic set if it is not there yet

    cfg = training_config(model.config, Path(model.source))
    return Path(cfg.data_root) if cfg.data_root else synthetic_root(cfg)


# ------------------------------------------------------------------------------------------
# Images


@dataclass
class ImageList:
    """Image paths, their In-Shop item ids when known, and where they came from."""

    paths: list[str]
    items: list[str] | None
    source: dict[str, str | None]  # {"root": absolute path, "split": In-Shop split or None}


def is_inshop_root(path: Path) -> bool:
    return (path / PARTITION_FILE).is_file()


def list_images(path: str | os.PathLike, split: str = "gallery") -> ImageList:
    """An In-Shop root (its `split`), a folder (every image below it), or one image file."""
    path = Path(path).resolve()
    if path.is_dir() and is_inshop_root(path):
        dataset = InShop(path, split)  # only its paths and items: the images are decoded by ImageFiles
        items = [dataset.item_ids[label] for _, label in dataset.samples]
        return ImageList([sample_path for sample_path, _ in dataset.samples], items,
                         {"root": str(path), "split": split})
    if path.is_dir():
        paths = sorted(str(p) for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not paths:
            raise ValueError(f"{path}: no images ({', '.join(IMAGE_SUFFIXES)}) found in this folder "
                             f"or below it, and no {PARTITION_FILE} (not an In-Shop root)")
        return ImageList(paths, None, {"root": str(path), "split": None})
    if path.is_file():
        return ImageList([str(path)], None, {"root": str(path), "split": None})
    raise FileNotFoundError(f"{path}: no such image, folder or In-Shop root")


class ImageFiles(Dataset):
    """(image, 0) pairs for a list of paths, in the format `arcface.retrieval` expects.

    ``max_pixels`` is passed on to `load_image`: an image whose header claims more pixels is
    refused before it is decoded.
    """

    def __init__(self, paths: list[str], transform: Callable[[Tensor], Tensor],
                 max_pixels: int = MAX_IMAGE_PIXELS) -> None:
        check_max_pixels(max_pixels)
        self.paths = paths
        self.transform = transform
        self.max_pixels = max_pixels

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        return self.transform(load_image(self.paths[index], self.max_pixels)), 0


# ------------------------------------------------------------------------------------------
# Output files


def write_json(data: Any, path: str | os.PathLike) -> None:
    with atomic_output(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2) + "\n")


def metadata_of(model: LoadedModel) -> dict[str, Any]:
    """What a result file says about the model that produced it."""
    return {"model": model.source, "fingerprint": model.fingerprint, "preprocess": model.preprocess.as_dict()}



# ------------------------------------------------------------------------------------------
# Several processes (under torchrun)


def decided_by_rank0(decide: Callable[[], Any], device: torch.device) -> Any:
    """`decide()` run on global rank 0 only, its result (small, picklable) given to every rank.

    A user error raised there is raised on every rank with rank 0's message, so the others stop
    at once instead of waiting in the next collective.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return decide()
    box: list[Any] = [None, None]
    raised: BaseException | None = None
    if dist.get_rank() == 0:
        try:
            box[0] = decide()
        except (OSError, ValueError, ImportError, SnapshotError) as error:
            raised, box[1] = error, user_message(error)
    # nccl moves CUDA tensors only; gloo wants CPU ones.
    dist.broadcast_object_list(box, src=0, device=device if dist.get_backend() == "nccl" else None)
    if raised is not None:
        raise raised
    if box[1] is not None:
        raise RankZeroError(box[1])
    return box[0]


class RankZeroError(UserError, ValueError):
    """What rank 0 refused, said on the other ranks too."""
