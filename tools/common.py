"""What the retrieval tools share: loading a model, listing images, fingerprints, atomic outputs.

A model comes from one of three files, and every tool accepts all three:

    runs/demo/snapshot.pt                       a training snapshot (support/snapshot.py)
    model.torchscript.pt                        an export of tools/export.py
    --mmpretrain FILE --arch resnet50 --num_classes 3997    an mmpretrain ArcFace checkpoint

Each becomes a `LoadedModel`: an `Embedder` (backbone -> pooling -> optional embedding layer,
no ArcFace head), the preprocessing it expects (sizes, mean, std and resize interpolation: those
of training, as the snapshot or the export records them), and a fingerprint of both.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import warnings
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from arcface.inshop import PARTITION_FILE, InShop
from arcface.model import (
    MMPRETRAIN_FAMILIES,
    RetrievalModel,
    build_model,
    family_of,
    fit_position_embedding,
    load_mmpretrain_retriever,
)
from arcface.rerank import (
    KR_K1,
    KR_K2,
    KR_LAMBDA,
    QE_ALPHA,
    QE_K,
    RERANK_METHODS,
    Rerank,
)
from arcface.transforms import (
    MAX_IMAGE_PIXELS,
    MEAN_RGB,
    STD_RGB,
    Preprocessing,
    check_max_pixels,
    load_image,
    test_transform,
)
from support.atomicfile import atomic_output
from support.config import Config, ConfigError, from_plain
from support.errors import one_line_errors
from support.snapshot import SnapshotError, read_snapshot
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
    """Test-time pipeline: resize to (resize, resize) with `interpolation`, centre crop (crop, crop),
    normalise RGB with mean and std on the 0-255 scale (ImageNet's and bilinear: the reference)."""

    resize: int
    crop: int
    mean: tuple[float, ...] = MEAN_RGB  # 0-255 scale
    std: tuple[float, ...] = STD_RGB
    interpolation: str = "bilinear"

    def __post_init__(self) -> None:
        # Preprocessing's checks (3 numbers each, std > 0, a known interpolation) on its 0-1 scale:
        # a damaged export's metadata stops here, in one line.
        try:
            Preprocessing(tuple(v / 255 for v in self.mean), tuple(v / 255 for v in self.std), self.interpolation)
        except TypeError:
            raise ValueError(f"preprocess: expected 3 numbers for mean and std, got {self.mean!r} and "
                             f"{self.std!r}") from None
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))  # JSON lists -> tuples
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))

    @classmethod
    def of(cls, resize: int, crop: int, preprocessing: Preprocessing) -> Preprocess:
        """The sizes with a backbone's normalisation and interpolation (a snapshot's record)."""
        return cls(resize, crop, preprocessing.mean_255, preprocessing.std_255, preprocessing.interpolation)

    def transform(self) -> Callable[[Tensor], Tensor]:
        return test_transform(self.resize, self.crop, mean=self.mean, std=self.std, interpolation=self.interpolation)

    def as_dict(self) -> dict[str, Any]:
        return {"resize": self.resize, "crop": self.crop, "mean": list(self.mean), "std": list(self.std),
                "interpolation": self.interpolation}


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
                       help=f"kr: neighbours of the k-reciprocal sets, the item itself not counted, as in "
                            f"Zhong et al.'s code (default {KR_K1})")
    group.add_argument("--kr_k2", type=int, default=KR_K2, metavar="K2",
                       help=f"kr: neighbours averaged in the local query expansion; 1 turns it off (default {KR_K2})")
    group.add_argument("--kr_lambda", type=float, default=KR_LAMBDA, metavar="L",
                       help=f"kr: weight of the original distance against the Jaccard distance, in [0, 1]; "
                            f"1 ranks by the original distance, i.e. plain cosine ranking (default {KR_LAMBDA:g})")


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


# What a tool reports in one line besides the front door's own: a bad argument (ValueError, of
# which catalog and index errors are), a missing optional package (ImportError).
TOOL_ERRORS = (ValueError, ImportError)


def run_cli(main: Callable[[list[str] | None], int]) -> int:
    """Runs a tool's main behind the project's one error front door (support.errors): bad input,
    a tool's bad argument (ValueError), a missing optional package (ImportError) and a mismatched
    index end with one `error: ...` line; returns the exit status."""
    try:
        return one_line_errors(main, also=TOOL_ERRORS)(None)
    except SystemExit as stop:
        return stop.code if isinstance(stop.code, int) else 1


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
        snapshot = read_snapshot(path)
    except SnapshotError as error:
        raise SnapshotError(
            f"{error}. Expected a training snapshot or a TorchScript export; for an mmpretrain "
            "checkpoint use --mmpretrain FILE --arch ARCH --num_classes N"
        ) from None
    cfg = training_config(snapshot.config, path)
    # The normalisation and interpolation the run trained with, as it recorded them: not what
    # the arch gives today (another timm version may differ), never ImageNet's by default.
    preprocess = Preprocess.of(resize or cfg.resize, crop or cfg.crop, Preprocessing.from_dict(snapshot.preprocessing))
    # The ArcFace scale and margins only shape training logits: embeddings do not depend on them.
    # A ViT is built for the crop it will see; its position embeddings, made for the training
    # crop, are interpolated when --crop asks for another.
    model = build_model(num_classes=snapshot.num_classes, arch=cfg.arch, pooling=cfg.pooling,
                        embedding_dim=cfg.embedding_dim or None, sub_centers=cfg.sub_centers,
                        image_size=preprocess.crop)
    prefix = "backbone."
    state = {key: fit_position_embedding(model.backbone, key.removeprefix(prefix), tensor, str(path))
             if key.startswith(prefix) else tensor for key, tensor in snapshot.model.items()}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise SnapshotError(f"{path}: the weights do not fit the model its config describes: {error}") from None
    embedder = Embedder(model).eval()
    return LoadedModel(embedder, preprocess, fingerprint(embedder.state_dict(), preprocess),
                       f"snapshot {path} (epoch {snapshot.epochs_run})", snapshot.config)


def training_config(values: dict[str, Any], path: Path) -> Config:
    """A snapshot's config dict -> Config; fields this version does not know are left out."""
    try:
        return from_plain(values, unknown="skip")
    except ConfigError as error:
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
    preprocess = preprocess_of(metadata, resize, crop)
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
    preprocess = preprocess_of(metadata, resize, crop)
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


def preprocess_of(metadata: dict[str, Any], resize: int | None = None, crop: int | None = None) -> Preprocess:
    """An export's recorded preprocessing; format 1 files predate "interpolation" and were all bilinear."""
    return Preprocess(resize or metadata["resize"], crop or metadata["crop"], tuple(metadata["mean"]),
                      tuple(metadata["std"]), metadata.get("interpolation", "bilinear"))


def fingerprint(state: dict[str, Tensor], preprocess: Preprocess) -> str:
    """sha256 of the embedding weights (names, dtypes, shapes, bytes) and the preprocessing.

    Computed from weights, not file bytes, so a snapshot and its TorchScript export agree, while
    continued training (other weights), another input size, normalisation or interpolation gives
    another fingerprint.
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
    from datautils import (
        synthetic_root,  # generates the synthetic set if it is not there yet
    )

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
