"""Export the embedding model (backbone, pooling, embedding layer; no ArcFace head) for deployment.

    python tools/export.py runs/demo/snapshot.pt                     # -> runs/demo/snapshot.torchscript.pt
    python tools/export.py runs/demo/snapshot.pt --torchscript model.pt --onnx model.onnx
    python tools/export.py runs/demo/snapshot.pt --exported model.pt2   # torch.export (ExportedProgram)
    python tools/export.py --mmpretrain inshop_r50.pth --arch resnet50 --num_classes 3997 --onnx r50.onnx

Input: float32 images (N, 3, crop, crop), RGB, resized to (resize, resize) without keeping the
aspect ratio (bilinear or bicubic: the backbone's, as in training), centre-cropped and normalised
as (x - mean) / std on the 0-255 scale with the statistics training used (ImageNet's, or a timm
backbone's own, e.g. CLIP's). Output:
(N, D) embeddings, not normalised; rank by cosine similarity. Both files record these sizes and
statistics: TorchScript and torch.export archives as the extra file `retrieval.json`
(tools/evaluate.py, tools/search.py and tools.api read both), ONNX as the metadata entry
`retrieval`. torch.export (`torch.export.load(path).module()`) is PyTorch's successor of
TorchScript, which recent torch marks deprecated; TorchScript stays for libtorch (C++) users. Each export is run back from
its file on a batch of random images and compared with the eager model before it is moved into
place; the maximum absolute difference is printed. Every backbone family exports, ViT and Swin
too: TorchScript by tracing, for the one crop the file records. ONNX is an optional extra:
`pip install onnx onnxscript onnxruntime`.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import sys
import warnings
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch
from torch import Tensor

from tools.common import (EXPORT_FORMAT, EXPORT_METADATA_FILE, LoadedModel, add_model_args, atomic_output,
                          is_exported_program, is_torchscript, model_from_args, run_cli)

ONNX_PACKAGES = ("onnx", "onnxscript", "onnxruntime")  # exporter, its dynamo back end, the check
ONNX_METADATA_KEY = "retrieval"
EXAMPLE_BATCH, CHECK_BATCH = 2, 3  # the check uses another batch size than the trace: batch stays dynamic


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(parser)
    parser.add_argument("--torchscript", default=None, metavar="FILE",
                        help="TorchScript file to write (default when --onnx is not given: "
                             "<model>.torchscript.pt next to the model)")
    parser.add_argument("--onnx", default=None, metavar="FILE", help="ONNX file to write")
    parser.add_argument("--exported", default=None, metavar="FILE",
                        help="torch.export archive (ExportedProgram, .pt2) to write, batch size dynamic")
    parser.add_argument("--tolerance", type=float, default=1e-4,
                        help="largest allowed |export - eager|, relative to the largest eager output")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.model is not None and Path(args.model).is_file() and (is_torchscript(Path(args.model))
                                                               or is_exported_program(Path(args.model))):
        raise ValueError(f"{args.model}: already an export; export from the snapshot instead")
    if args.onnx:
        require_onnx()  # before any work: a missing extra should not cost a TorchScript export first
    model = model_from_args(args)
    metadata = export_metadata(model)
    torchscript_path = args.torchscript
    if torchscript_path is None and args.onnx is None and args.exported is None:
        model_file = Path(args.mmpretrain or args.model)
        torchscript_path = model_file.with_name(model_file.stem + ".torchscript.pt")
    if torchscript_path:
        difference = export_torchscript(model, torchscript_path, metadata, args.tolerance)
        print(f"TorchScript written to {torchscript_path}: max |export - eager| = {difference:.3g}")
    if args.onnx:
        difference = export_onnx(model, args.onnx, metadata, args.tolerance)
        print(f"ONNX written to {args.onnx}: max |export - eager| = {difference:.3g}")
    if args.exported:
        difference = export_program(model, args.exported, metadata, args.tolerance)
        print(f"ExportedProgram written to {args.exported}: max |export - eager| = {difference:.3g}")
    return 0


def export_metadata(model: LoadedModel) -> dict[str, Any]:
    """What a consumer of the file needs to feed it: input size, normalisation, output size."""
    preprocess = model.preprocess
    with torch.inference_mode():
        embedding_dim = model.module(example_images(model, 1)).shape[1]
    return {
        "format": EXPORT_FORMAT,
        "format_version": 2,  # 2: "interpolation" recorded (format 1 files were all bilinear)
        **preprocess.as_dict(),
        "input": (f"float32 (N, 3, {preprocess.crop}, {preprocess.crop}) RGB: resize to "
                  f"({preprocess.resize}, {preprocess.resize}) ({preprocess.interpolation}, aspect ratio not kept), "
                  "centre crop, (x - mean) / std with mean and std on the 0-255 scale"),
        "output": f"float32 (N, {embedding_dim}) embeddings, not normalised: rank by cosine similarity",
        "embedding_dim": embedding_dim,
        "source": model.source,
        "fingerprint": model.fingerprint,
        "config": model.config,
    }


def example_images(model: LoadedModel, batch: int, seed: int = 0) -> Tensor:
    """Random normalised-scale images of the model's input size (standard normal ~ normalised pixels)."""
    crop = model.preprocess.crop
    return torch.randn(batch, 3, crop, crop, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------
# TorchScript


def export_torchscript(model: LoadedModel, path: str | Path, metadata: dict[str, Any],
                       tolerance: float = 1e-4) -> float:
    """Trace, save, load back and compare with the eager model; returns the max abs difference."""
    module = model.module.eval()
    with torch.no_grad(), warnings.catch_warnings():
        # torch >= 2.9 marks TorchScript deprecated, yet it is what C++ (libtorch) deployments load.
        warnings.simplefilter("ignore", FutureWarning)
        # ViT and Swin read the image size as Python numbers (ViT's size check, Swin's window
        # padding), which the tracer warns about: the export is for one crop anyway, and the
        # check below runs another batch size, so a batch size frozen into the trace would fail it.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        traced = torch.jit.trace(module, example_images(model, EXAMPLE_BATCH))
        with atomic_output(path) as tmp:
            torch.jit.save(traced, str(tmp), _extra_files={EXPORT_METADATA_FILE: json.dumps(metadata)})
            reloaded = torch.jit.load(str(tmp), map_location="cpu")
            check_images = example_images(model, CHECK_BATCH, seed=1)
            difference = check_close("TorchScript", reloaded(check_images), module(check_images), tolerance)
    return difference


# ------------------------------------------------------------------------------------------
# torch.export


def export_program(model: LoadedModel, path: str | Path, metadata: dict[str, Any], tolerance: float = 1e-4) -> float:
    """torch.export with a dynamic batch, save, load back and compare; returns the max abs difference."""
    module = model.module.eval()
    with torch.no_grad():
        program = torch.export.export(module, (example_images(model, EXAMPLE_BATCH),),
                                      dynamic_shapes=({0: torch.export.Dim.DYNAMIC},))
        with atomic_output(path) as tmp:
            torch.export.save(program, str(tmp), extra_files={EXPORT_METADATA_FILE: json.dumps(metadata)})
            reloaded = torch.export.load(str(tmp)).module()
            check_images = example_images(model, CHECK_BATCH, seed=1)
            difference = check_close("ExportedProgram", reloaded(check_images), module(check_images), tolerance)
    return difference


# ------------------------------------------------------------------------------------------
# ONNX (optional extra)


def require_onnx() -> tuple[Any, Any]:
    """(onnx, onnxruntime), or an ImportError naming the packages to install."""
    missing = [name for name in ONNX_PACKAGES if importlib.util.find_spec(name) is None]
    if missing:
        raise ImportError(f"ONNX export is an optional extra, missing {', '.join(missing)}: "
                          f"pip install {' '.join(ONNX_PACKAGES)}")
    return importlib.import_module("onnx"), importlib.import_module("onnxruntime")


def export_onnx(model: LoadedModel, path: str | Path, metadata: dict[str, Any], tolerance: float = 1e-4) -> float:
    """Export (batch dimension dynamic), record metadata, run with onnxruntime, compare with eager."""
    onnx, onnxruntime = require_onnx()
    module = model.module.eval()
    with atomic_output(path) as tmp, torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", (FutureWarning, DeprecationWarning, UserWarning))
        program = torch.onnx.export(
            module, (example_images(model, EXAMPLE_BATCH),), dynamo=True, input_names=["images"],
            output_names=["embeddings"], dynamic_shapes={"images": {0: torch.export.Dim("batch")}},
            verbose=False,
        )
        program.save(str(tmp))
        proto = onnx.load(str(tmp))
        entry = proto.metadata_props.add()
        entry.key, entry.value = ONNX_METADATA_KEY, json.dumps(metadata)
        onnx.save(proto, str(tmp))
        session = onnxruntime.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
        check_images = example_images(model, CHECK_BATCH, seed=1)
        (exported,) = session.run(None, {"images": check_images.numpy()})
        difference = check_close("ONNX", torch.from_numpy(np.asarray(exported)), module(check_images), tolerance)
    return difference


# ------------------------------------------------------------------------------------------


def check_close(name: str, exported: Tensor, eager: Tensor, tolerance: float) -> float:
    """max |exported - eager|; raises when it exceeds tolerance x max(1, max |eager|)."""
    if exported.shape != eager.shape:
        raise ValueError(f"{name} export returns shape {tuple(exported.shape)}, "
                         f"the eager model {tuple(eager.shape)}")
    difference = (exported.float() - eager.float()).abs().max().item()
    allowed = tolerance * max(1.0, eager.abs().max().item())
    if not difference <= allowed:
        raise ValueError(f"{name} export differs from the eager model by {difference:.3g} "
                         f"(allowed {allowed:.3g}); the file was not written")
    return difference


if __name__ == "__main__":
    sys.exit(run_cli(main))
