"""Retrieval model: torchvision ResNet trunk -> pooling neck -> optional embedding -> ArcFace head.

State-dict keys are torchvision's under `backbone.` (e.g. `backbone.layer1.0.conv1.weight`),
which is also the layout of mmpretrain's ResNet checkpoints, so published weights load without
renaming. The head is only used for training; retrieval uses `embed(images)`.
"""

import os
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field

import torch
import torchvision
from torch import nn

from arcface.head import ArcFaceHead
from arcface.textfile import DataError

_RESNETS = {
    "resnet18": torchvision.models.resnet18,
    "resnet34": torchvision.models.resnet34,
    "resnet50": torchvision.models.resnet50,
    "resnet101": torchvision.models.resnet101,
    "resnet152": torchvision.models.resnet152,
}
# The values `build_model` accepts; config.py offers exactly these.
ARCHS = tuple(_RESNETS)
POOLINGS = ("avg", "gem")

# The best ImageNet-1k weights torchvision publishes for each depth (V2 where it exists).
_IMAGENET_WEIGHTS = {
    "resnet18": torchvision.models.ResNet18_Weights.IMAGENET1K_V1,
    "resnet34": torchvision.models.ResNet34_Weights.IMAGENET1K_V1,
    "resnet50": torchvision.models.ResNet50_Weights.IMAGENET1K_V2,
    "resnet101": torchvision.models.ResNet101_Weights.IMAGENET1K_V2,
    "resnet152": torchvision.models.ResNet152_Weights.IMAGENET1K_V2,
}

# Wrappers a saved model's keys may carry: DistributedDataParallel and torch.compile.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
# Where the trunk lives in a full model's state dict: this project and mmpretrain classifiers
# (`backbone.`), mmpretrain's ImageToImageRetriever (`image_encoder.0.`).
_BACKBONE_PREFIXES = ("backbone.", "image_encoder.0.")


class GlobalAvgPool(nn.Module):
    """(N, C, H, W) -> (N, C) mean over space."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3))


class GeM(nn.Module):
    """Generalised mean pooling (Radenovic et al.): (mean over space of x^p)^(1/p), p learnable.

    p = 1 is average pooling and p -> inf max pooling; p starts at 3. `p` has shape (1,), the
    layout of mmpretrain's GeneralizedMeanPooling, so its checkpoints load as is.
    """

    def __init__(self, p: float = 3.0, eps: float = 1e-6) -> None:
        super().__init__()
        self.p = nn.Parameter(torch.full((1,), float(p)))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # float32 even under autocast: ReLU activations of ~40 cubed overflow float16 (max 65504).
        with torch.autocast(device_type=x.device.type, enabled=False):
            powered = x.float().clamp(min=self.eps).pow(self.p)  # (N, C, H, W)
            return powered.mean(dim=(2, 3)).pow(1.0 / self.p)  # (N, C)

    def extra_repr(self) -> str:
        return f"p={self.p.item():.4g}, eps={self.eps:g}"


class RetrievalModel(nn.Module):
    """images -> embedding (retrieval) or ArcFace logits (training, when labels are given).

    Training calls `model(images, labels)` so that one forward touches every parameter (DDP
    requires it) and `F.cross_entropy(output, labels)` is the loss. Retrieval calls
    `model(images)` or `model.embed(images)`; embeddings are not L2-normalised here.
    """

    def __init__(
        self, backbone: nn.Module, neck: nn.Module, embedding: nn.Module, head: ArcFaceHead
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.neck = neck
        self.embedding = embedding
        self.head = head

    @property
    def embedding_dim(self) -> int:
        return self.head.in_features

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) -> (N, embedding_dim)."""
        feature_map = self.backbone(images)  # (N, C, H/32, W/32)
        pooled = self.neck(feature_map)  # (N, C)
        return self.embedding(pooled)  # (N, D)

    def forward(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        features = self.embed(images)  # (N, D)
        if labels is None:
            return features
        return self.head(features, labels)  # (N, num_classes)


def build_model(
    num_classes: int,
    arch: str = "resnet50",
    pretrained: str | None = None,
    pooling: str = "avg",
    embedding_dim: int | None = None,
    scale: float = 64.0,
    margin: float | list[float] | str | os.PathLike = 0.5,
    sub_centers: int = 1,
    easy_margin: bool = False,
) -> RetrievalModel:
    """A ResNet retrieval model with an ArcFace head.

    pretrained: None (random init), "imagenet" (torchvision's weights, needs network access or
    the file in torch's hub cache), or the path of a local backbone checkpoint.
    pooling: "avg" or "gem". embedding_dim: None uses the pooled feature (2048 for ResNet-50)
    as the embedding; an int adds Linear(C, d, bias=False) + BatchNorm1d(d).
    """
    if arch not in ARCHS:
        raise ValueError(f"arch: expected one of {', '.join(ARCHS)}, got {arch!r}")
    if pooling not in POOLINGS:
        raise ValueError(f"pooling: expected {' or '.join(map(repr, POOLINGS))}, got {pooling!r}")
    if embedding_dim is not None and (not isinstance(embedding_dim, int) or embedding_dim < 1):
        raise ValueError(
            f"embedding_dim: expected a positive integer or None, got {embedding_dim!r}"
        )
    resnet = _RESNETS[arch](weights=None)
    pooled_dim = resnet.fc.in_features
    backbone = resnet_trunk(resnet)
    neck = GeM() if pooling == "gem" else GlobalAvgPool()
    if embedding_dim is None:
        embedding = nn.Identity()
    else:
        embedding = nn.Sequential(
            nn.Linear(pooled_dim, embedding_dim, bias=False), nn.BatchNorm1d(embedding_dim)
        )
    head = ArcFaceHead(
        embedding_dim or pooled_dim, num_classes, scale, margin, sub_centers, easy_margin
    )
    model = RetrievalModel(backbone, neck, embedding, head)
    if pretrained is not None:
        load_pretrained_backbone(model.backbone, arch, pretrained)
    return model


def resnet_trunk(resnet: torchvision.models.ResNet) -> nn.Sequential:
    """A torchvision ResNet without avgpool and fc: (N, 3, H, W) -> (N, C, H/32, W/32).

    The children keep their torchvision names, so the trunk's state-dict keys are exactly
    torchvision's (`conv1.weight`, `layer1.0.conv1.weight`, ...).
    """
    names = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")
    return nn.Sequential(OrderedDict((name, getattr(resnet, name)) for name in names))


@dataclass
class BackboneLoadReport:
    """What a non-strict backbone load left out, by backbone key."""

    missing_keys: list[str] = field(default_factory=list)  # in the backbone, not in the file
    unexpected_keys: list[str] = field(default_factory=list)  # in the file, not in the backbone
    ignored_keys: list[str] = field(default_factory=list)  # file keys of other parts (fc, head)


def load_pretrained_backbone(
    backbone: nn.Module, arch: str, pretrained: str | os.PathLike
) -> BackboneLoadReport:
    """Load "imagenet" (torchvision) or a local checkpoint into a `resnet_trunk`."""
    if pretrained == "imagenet":
        weights = _IMAGENET_WEIGHTS[arch]
        return load_backbone_state(backbone, imagenet_state_dict(arch), f"torchvision {weights}")
    return load_backbone_state(backbone, read_state_dict(pretrained), os.fspath(pretrained))


def imagenet_state_dict(arch: str) -> dict[str, torch.Tensor]:
    """torchvision's ImageNet weights for `arch`, from torch's hub cache or the network."""
    weights = _IMAGENET_WEIGHTS[arch]
    try:
        return torch.hub.load_state_dict_from_url(
            weights.url, map_location="cpu", progress=False, check_hash=True, weights_only=True
        )
    except Exception as error:  # no network, proxy, corrupt download: all end the same way
        file_name = os.path.basename(weights.url)
        raise RuntimeError(
            f"could not download torchvision's {arch} ImageNet weights ({weights}) from "
            f"{weights.url}: {type(error).__name__}: {error}. Without network access, copy that "
            f"file here from a machine that has it and pass its path instead: "
            f"pretrained=/path/to/{file_name}"
        ) from error


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A checkpoint file -> its flat {key: tensor} state dict, loaded with weights_only=True.

    Accepts a plain state dict or one wrapped under "state_dict" (mmpretrain, Lightning) or
    "model" (this project's snapshots, many others); other top-level entries are ignored.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise DataError(
            f"{path}: not a PyTorch checkpoint of tensors ({type(error).__name__}: {reason}). "
            "Files holding other Python objects are refused because unpickling them can run "
            "code; if the file is trusted, re-save only its state dict: "
            "torch.save(torch.load(path, weights_only=False)['state_dict'], new_path)"
        ) from error
    state = _unwrap_state_dict(checkpoint)
    if not isinstance(state, dict) or not state:
        raise DataError(
            f"{path}: expected a non-empty dict of tensors (optionally under 'state_dict' or "
            f"'model'), found {type(state).__name__}"
        )
    for key, value in state.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise DataError(
                f"{path}: expected a state dict of tensors, but key {key!r} holds a "
                f"{type(value).__name__}"
            )
    return state


def _unwrap_state_dict(checkpoint: object) -> object:
    for wrapper in ("state_dict", "model"):
        if isinstance(checkpoint, dict) and isinstance(checkpoint.get(wrapper), dict):
            return _unwrap_state_dict(checkpoint[wrapper])
    return checkpoint


def load_backbone_state(
    backbone: nn.Module, state: dict[str, torch.Tensor], source: str
) -> BackboneLoadReport:
    """Load backbone weights from a torchvision, DDP-wrapped or full-model state dict.

    Keys with a `backbone.` prefix are the trunk when any key has one (other keys, e.g. `head.*`,
    belong to other parts); otherwise keys are plain torchvision names and `fc.*` is dropped.
    Shapes must match; missing and unexpected keys are reported (returned and warned once).
    """
    trunk_state, ignored = _select_backbone_keys(state, source)
    expected = backbone.state_dict()
    for key, (source_key, tensor) in trunk_state.items():
        if key in expected and expected[key].shape != tensor.shape:
            raise DataError(
                f"{source}: {source_key!r} has shape {tuple(tensor.shape)}, but the backbone's "
                f"{key!r} has shape {tuple(expected[key].shape)} (a different architecture?)"
            )
    result = backbone.load_state_dict(
        {key: tensor for key, (_, tensor) in trunk_state.items()}, strict=False
    )
    report = BackboneLoadReport(
        sorted(result.missing_keys), sorted(result.unexpected_keys), ignored
    )
    if report.missing_keys or report.unexpected_keys:
        warnings.warn(
            f"{source}: backbone weights loaded with {len(report.missing_keys)} missing keys "
            f"{_preview(report.missing_keys)} and {len(report.unexpected_keys)} unexpected keys "
            f"{_preview(report.unexpected_keys)}",
            stacklevel=2,
        )
    return report


def _select_backbone_keys(
    state: dict[str, torch.Tensor], source: str
) -> tuple[dict[str, tuple[str, torch.Tensor]], list[str]]:
    """-> ({trunk key: (file key, tensor)}, file keys that belong to other parts)."""
    unwrapped = {_strip_wrappers(key): key for key in state}
    if len(unwrapped) != len(state):
        raise DataError(f"{source}: keys collide once 'module.'/'_orig_mod.' prefixes are removed")
    has_prefix = any(key.startswith(_BACKBONE_PREFIXES) for key in unwrapped)
    trunk_state, ignored = {}, []
    for key, source_key in unwrapped.items():
        prefix = next((p for p in _BACKBONE_PREFIXES if key.startswith(p)), None)
        trunk_key = key[len(prefix) :] if prefix else key
        if has_prefix and prefix is None or trunk_key.startswith("fc."):
            ignored.append(source_key)  # head, neck, classifier: not part of the trunk
            continue
        if trunk_key in trunk_state:
            raise DataError(
                f"{source}: {source_key!r} and {trunk_state[trunk_key][0]!r} both give the "
                f"backbone's {trunk_key!r}"
            )
        trunk_state[trunk_key] = (source_key, state[source_key])
    return trunk_state, sorted(ignored)


def _strip_wrappers(key: str) -> str:
    while key.startswith(_WRAPPER_PREFIXES):
        key = key.split(".", 1)[1]
    return key


def _preview(keys: list[str], limit: int = 5) -> str:
    shown = ", ".join(keys[:limit])
    return f"[{shown}{', ...' if len(keys) > limit else ''}]"


def load_mmpretrain_retriever(model: RetrievalModel, path: str | os.PathLike) -> None:
    """Load a full mmpretrain ArcFace checkpoint (e.g. the In-Shop ResNet-50 one) into `model`.

    mmpretrain keeps the trunk under `backbone.` (classifier) or `image_encoder.0.` (retriever),
    in torchvision layout, a GeM neck's p under `neck.p` / `image_encoder.1.p`, and the ArcFace
    weight as `head.norm_product.weight` with the same (classes * sub_centers, in_features) row
    order as `ArcFaceHead.weight`. Every model key must be present with the same shape.
    `data_preprocessor.*` entries are ignored: normalisation belongs to the transforms here.
    """
    path = os.fspath(path)
    state = {}
    for source_key, tensor in read_state_dict(path).items():
        key = _mmpretrain_to_model_key(_strip_wrappers(source_key))
        if key is not None:
            state[key] = tensor
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        hint = ""
        if any(key.startswith("embedding.") for key in missing):
            hint = " (mmpretrain's ArcFace models have no embedding layer: use embedding_dim=None)"
        raise DataError(
            f"{path}: does not match the model: missing {_preview(missing)}, "
            f"unexpected {_preview(unexpected)}{hint}"
        )
    for key, tensor in state.items():
        if tensor.shape != expected[key].shape:
            raise DataError(
                f"{path}: {key!r} has shape {tuple(tensor.shape)} in the file but "
                f"{tuple(expected[key].shape)} in the model (check arch, num_classes * "
                "sub_centers and embedding_dim)"
            )
    model.load_state_dict(state, strict=True)


def _mmpretrain_to_model_key(key: str) -> str | None:
    """An mmpretrain key -> this model's key; None for entries with no counterpart here."""
    if key.startswith("data_preprocessor."):
        return None
    if key == "head.norm_product.weight":
        return "head.weight"
    if key.startswith("image_encoder.0."):
        return "backbone." + key.removeprefix("image_encoder.0.")
    if key.startswith("image_encoder.1."):
        return "neck." + key.removeprefix("image_encoder.1.")
    return key
