"""Retrieval model: torchvision trunk -> pooling neck -> optional embedding -> ArcFace head.

The trunk is a torchvision classification model (ResNet, ResNeXt, Wide ResNet, ConvNeXt,
EfficientNet and EfficientNet-V2, RegNet, MobileNet-V3, Swin and Swin-V2, ViT) without its
pooling and classification layers. Its state-dict keys are torchvision's under `backbone.` (e.g.
`backbone.layer1.0.conv1.weight`, `backbone.features.0.0.weight`), so a torchvision state dict
loads as is; for ResNet this is also the layout of mmpretrain's checkpoints, so published
weights load without renaming. The head is only used for training; retrieval uses
`embed(images)`.

`arch = "timm/NAME"` or `"timm/NAME.TAG"` takes any timm model instead (CLIP, DINO, DINOv2, SigLIP
ViTs, ConvNeXt, EfficientNet, ...): timm is an optional extra, and arcface/timm_backbone.py says how
such a trunk is built, pooled and loaded. `preprocessing_for(arch)` gives the normalisation and
resize interpolation each trunk's weights expect.
"""

import difflib
import importlib
import os
import warnings
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from types import ModuleType

import torch
import torchvision
from torch import nn
from torchvision import models as tv
from torchvision.models.vision_transformer import VisionTransformer, interpolate_embeddings

from arcface.head import ArcFaceHead
from arcface.textfile import DataError
from arcface.transforms import IMAGENET, Preprocessing

# The torchvision classification models accepted as the trunk, by family, as their builders (the
# name is the builder's: `resnet50`, `convnext_tiny`, `vit_b_16`). Each is built without weights;
# `pretrained` loads them afterwards. ResNeXt and Wide ResNet are torchvision ResNets.
FAMILIES: dict[str, tuple[Callable[..., nn.Module], ...]] = {
    "ResNet": (tv.resnet18, tv.resnet34, tv.resnet50, tv.resnet101, tv.resnet152),
    "ResNeXt": (tv.resnext50_32x4d, tv.resnext101_32x8d, tv.resnext101_64x4d),
    "Wide ResNet": (tv.wide_resnet50_2, tv.wide_resnet101_2),
    "ConvNeXt": (tv.convnext_tiny, tv.convnext_small, tv.convnext_base, tv.convnext_large),
    "EfficientNet": (tv.efficientnet_b0, tv.efficientnet_b1, tv.efficientnet_b2, tv.efficientnet_b3,
                     tv.efficientnet_b4, tv.efficientnet_b5, tv.efficientnet_b6, tv.efficientnet_b7),
    "EfficientNet-V2": (tv.efficientnet_v2_s, tv.efficientnet_v2_m, tv.efficientnet_v2_l),
    "RegNet": (tv.regnet_x_400mf, tv.regnet_x_800mf, tv.regnet_x_1_6gf, tv.regnet_x_3_2gf, tv.regnet_x_8gf,
               tv.regnet_x_16gf, tv.regnet_x_32gf, tv.regnet_y_400mf, tv.regnet_y_800mf, tv.regnet_y_1_6gf,
               tv.regnet_y_3_2gf, tv.regnet_y_8gf, tv.regnet_y_16gf, tv.regnet_y_32gf, tv.regnet_y_128gf),
    "MobileNet-V3": (tv.mobilenet_v3_small, tv.mobilenet_v3_large),
    "Swin": (tv.swin_t, tv.swin_s, tv.swin_b),
    "Swin-V2": (tv.swin_v2_t, tv.swin_v2_s, tv.swin_v2_b),
    "ViT": (tv.vit_b_16, tv.vit_b_32, tv.vit_l_16, tv.vit_l_32, tv.vit_h_14),
}
# "ResNet, ResNeXt, ..., Swin-V2 or ViT", for the help and error messages.
FAMILY_LIST = f"{', '.join(list(FAMILIES)[:-1])} or {list(FAMILIES)[-1]}"
_BUILDERS = {builder.__name__: builder for builders in FAMILIES.values() for builder in builders}
_FAMILY_OF = {builder.__name__: family for family, builders in FAMILIES.items() for builder in builders}
# The torchvision values `build_model` accepts; support/config.py offers these and "timm/NAME[.TAG]".
ARCHS = tuple(_BUILDERS)
# What starts an arch that names a timm model ("timm/vit_small_patch16_224.dino").
TIMM_PREFIX = "timm/"
POOLINGS = ("avg", "gem")
# The families built by torchvision's ResNet class, whose layout mmpretrain's ResNet checkpoints share.
MMPRETRAIN_FAMILIES = ("ResNet", "ResNeXt", "Wide ResNet")
# torchvision's classification layers, one name per family (ResNet and RegNet `fc`, ConvNeXt,
# EfficientNet and MobileNet `classifier`, Swin `head`, ViT `heads`): never part of the trunk.
_CLASSIFIER_PREFIXES = ("fc.", "classifier.", "head.", "heads.")

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
    """images -> embedding (retrieval) or the batch's ArcFace loss (training, when labels are given).

    Training calls `model(images, labels, step)` so that one forward touches every parameter (DDP
    requires it); the head computes the loss (`head.loss`: a dense ArcFaceHead or a Partial FC
    shard, whose class sample depends on the optimizer step). Retrieval calls `model(images)` or
    `model.embed(images)`; embeddings are not L2-normalised here.
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
        features = self.backbone(images)  # (N, C, H/32, W/32); a ViT's class token (N, C)
        pooled = self.neck(features)  # (N, C)
        return self.embedding(pooled)  # (N, D)

    def forward(self, images: torch.Tensor, labels: torch.Tensor | None = None, step: int = 0) -> torch.Tensor:
        features = self.embed(images)  # (N, D)
        if labels is None:
            return features
        return self.head.loss(features, labels, step)  # scalar, float32


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
    image_size: int = 224,
    drop_path: float | None = None,
) -> RetrievalModel:
    """A retrieval model on a torchvision trunk (any name in ARCHS) or a timm one ("timm/NAME" or
    "timm/NAME.TAG") with an ArcFace head.

    pretrained: None (random init), "imagenet" (torchvision's DEFAULT weights of `arch`, needs
    network access or the file in torch's hub cache), or the path of a local backbone checkpoint.
    pooling: "avg" or "gem" over the trunk's last feature map; a ViT has none and embeds with its
    class token, so it takes "avg" only. embedding_dim: None uses the pooled feature (2048 for
    ResNet-50, 768 for ConvNeXt-T and ViT-B) as the embedding; an int adds
    Linear(C, d, bias=False) + BatchNorm1d(d). image_size: the side of the square images the
    model will see (the crop); a ViT's position embeddings are made for it, the other trunks take
    any size and only check a minimum.

    A timm trunk (arcface/timm_backbone.py) pools itself: "avg" is the model's own pooling (its
    pooled pre-logits feature is the embedding when embedding_dim is None), "gem" replaces its
    global average pool where it has one. pretrained "timm" loads the tag's weights.
    drop_path: timm's stochastic depth rate (drop_path_rate) for a timm trunk; None keeps timm's
    default. torchvision trunks keep their builders' own stochastic depth and take None or 0 only.
    """
    check_backbone(arch, pooling, image_size, drop_path)
    if embedding_dim is not None and (not isinstance(embedding_dim, int) or embedding_dim < 1):
        raise ValueError(
            f"embedding_dim: expected a positive integer or None, got {embedding_dim!r}"
        )
    if is_timm_arch(arch):
        backbone, pooled_dim = _timm_backbone().build(arch, pooling, image_size, drop_path)
        neck = nn.Identity()  # timm's model pools: its own pooling, or GeM in place of its pool
    else:
        backbone, pooled_dim = classifier_trunk(build_torchvision(arch, image_size))
        if isinstance(backbone, VisionTransformer):
            neck = nn.Identity()  # the class token is already one vector per image
        else:
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


def check_backbone(
    arch: str, pooling: str = "avg", image_size: int = 224, drop_path: float | None = None
) -> None:
    """Raises a one-line ValueError naming the key (arch, pooling, crop, drop_path) that
    `build_model` cannot use; cheap (nothing is built; a timm model is built once on the meta
    device, without weights), so support/config.py checks a configuration with it."""
    if drop_path is not None and (isinstance(drop_path, bool) or not isinstance(drop_path, (int, float))
                                  or not 0 <= drop_path < 1):
        raise ValueError(f"drop_path: expected a number in [0, 1) or None, got {drop_path!r}")
    if is_timm_arch(arch):
        _timm_backbone().check(arch, pooling, image_size, drop_path)
        return
    if drop_path:
        raise ValueError(
            f"drop_path: only timm backbones (arch = \"timm/NAME\") take it; torchvision's {arch} keeps "
            f"its builder's own stochastic depth, so use drop_path = 0; got {drop_path}"
        )
    if arch not in _BUILDERS:
        raise ValueError(f"arch: {_unknown_arch(arch)}")
    if pooling not in POOLINGS:
        raise ValueError(f"pooling: expected {' or '.join(map(repr, POOLINGS))}, got {pooling!r}")
    family = _FAMILY_OF[arch]
    if family == "ViT" and pooling == "gem":
        raise ValueError(
            f"pooling: 'gem' pools a feature map, but {arch} is a ViT, which embeds with its class "
            'token and has no map: use pooling = "avg" (for a ViT: the class token)'
        )
    if family == "ViT" and image_size % vit_patch_size(arch):
        patch = vit_patch_size(arch)
        below, above = image_size // patch * patch, (image_size // patch + 1) * patch
        fits = f"{below} or {above}" if below else f"{above}"
        raise ValueError(
            f"crop: {arch} cuts images into {patch} x {patch} patches, so the crop must be a "
            f"multiple of {patch}; got {image_size} (e.g. crop = {fits})"
        )
    least = _MIN_IMAGE_SIZE.get(family, 1)
    if image_size < least:
        raise ValueError(
            f"crop: {arch} needs images of at least {least} x {least} pixels, got {image_size}"
        )


# The smallest input each family takes: ConvNeXt's 4-pixel stem and three 2x downsamplings need
# 32 pixels, Swin's 4 x 4 patches 4 (it pads every other step itself); ViT patches divide the crop.
_MIN_IMAGE_SIZE = {"ConvNeXt": 32, "Swin": 4, "Swin-V2": 4}


def vit_patch_size(arch: str) -> int:
    """vit_b_16 -> 16: torchvision's ViT names end with their patch size."""
    return int(arch.rsplit("_", 1)[1])


def family_of(arch: str) -> str:
    """'convnext_tiny' -> 'ConvNeXt' (a key of FAMILIES); 'timm' for a timm arch."""
    check_backbone(arch)
    return "timm" if is_timm_arch(arch) else _FAMILY_OF[arch]


def is_timm_arch(arch: object) -> bool:
    """Whether `arch` names a timm model ("timm/NAME" or "timm/NAME.TAG"); imports nothing."""
    return isinstance(arch, str) and arch.startswith(TIMM_PREFIX)


def is_timm_model(module: nn.Module) -> bool:
    """Whether `module` is a timm model (the trunk of a timm arch)."""
    return type(module).__module__.startswith("timm.")


def _timm_backbone() -> ModuleType:
    """arcface.timm_backbone, imported when a timm arch is first used (it imports this module)."""
    return importlib.import_module("arcface.timm_backbone")


def preprocessing_for(arch: str) -> Preprocessing:
    """The mean, std (0-1 scale) and resize interpolation the weights of `arch` were trained with:
    ImageNet's and bilinear (the reference recipe) for torchvision archs, the pretrained
    configuration of the tag for timm archs (CLIP's own statistics for CLIP models, and so on)."""
    if is_timm_arch(arch):
        return _timm_backbone().preprocessing(arch)
    check_backbone(arch)
    return IMAGENET


def _unknown_arch(arch: str) -> str:
    """Why `arch` is refused, with the accepted names closest to it."""
    close = difflib.get_close_matches(arch.lower(), ARCHS, n=3, cutoff=0.6)
    if arch.lower() in _BUILDERS:
        close = [arch.lower()]  # names are lower case
    if close:
        names = list(map(repr, close))
        hint = f"did you mean {', '.join(names[:-1]) + ' or ' if len(names) > 1 else ''}{names[-1]}?"
    else:
        hint = "e.g. 'resnet50', 'convnext_tiny', 'vit_b_16' or 'efficientnet_b0'"
    what = ("a torchvision model, but not of an accepted family"
            if arch in tv.list_models(module=tv) else "not a known backbone")
    return (
        f"{arch!r} is {what}; {hint}{_timm_hint(arch)} (accepted: the torchvision {FAMILY_LIST} "
        "models; python -c 'import arcface.model as m; print(*m.ARCHS)' lists them; or "
        f"{TIMM_PREFIX}NAME for a timm model)"
    )


def _timm_hint(arch: str) -> str:
    """'; timm has it: arch = "timm/vgg16"' when timm is installed and has a model of that name
    that torchvision's accepted ones do not cover."""
    name = arch.lower()
    if name in _BUILDERS:
        return ""
    try:
        timm = importlib.import_module("timm")
    except ImportError:
        return ""
    return f'; timm has it: arch = "{TIMM_PREFIX}{name}"' if timm.is_model(name) else ""


def build_torchvision(arch: str, image_size: int = 224) -> nn.Module:
    """torchvision's classification model `arch`, randomly initialised (a ViT for image_size)."""
    if is_timm_arch(arch):
        raise ValueError(f"arch: {arch!r} is a timm model, not a torchvision one: build it with build_model")
    check_backbone(arch, image_size=image_size)
    if _FAMILY_OF[arch] == "ViT":
        return _BUILDERS[arch](weights=None, image_size=image_size)
    return _BUILDERS[arch](weights=None)


def classifier_trunk(net: nn.Module) -> tuple[nn.Module, int]:
    """A torchvision classification model without its pooling and classification layers, and
    the width of its feature (the classifier's input).

    For a convolutional model (and Swin) the trunk is the children before `avgpool`, in order
    and under their names, so its state-dict keys are torchvision's minus the classifier's
    (`conv1.weight`, `layer1.0.conv1.weight` for ResNet; `features.0.0.weight` for ConvNeXt):
    (N, 3, H, W) -> (N, C, h, w); Swin's (N, h, w, C) map is permuted by Swin's own `permute`.
    MobileNet-V3 loses its classifier's Linear + Hardswish pre-logits layer with the rest: the
    feature is the pooled map (576 or 960 wide). ConvNeXt's classifier starts with a LayerNorm
    (applied after pooling); the trunk keeps it as `classifier.0` and applies it at every
    position of the map instead, before pooling (mmpretrain's `gap_before_final_norm=False`), so
    that avg and GeM pool the same normalised map and the pretrained norm is not lost.
    A ViT keeps every module but `heads`: (N, 3, S, S) -> (N, C), the class token after the
    encoder's final LayerNorm.
    """
    if isinstance(net, VisionTransformer):
        width = net.hidden_dim
        net.heads = nn.Identity()
        return net, width
    names = [name for name, _ in net.named_children()]
    pool = names.index("avgpool")
    classifier = [getattr(net, name) for name in names[pool + 1 :]]
    linear = next(m for part in classifier for m in part.modules() if isinstance(m, nn.Linear))
    trunk = OrderedDict((name, getattr(net, name)) for name in names[:pool])
    if isinstance(net, tv.ConvNeXt):
        trunk["classifier"] = nn.Sequential(net.classifier[0])  # LayerNorm2d: keys classifier.0.*
    return nn.Sequential(trunk), linear.in_features


@dataclass
class BackboneLoadReport:
    """What a non-strict backbone load left out or adapted, by backbone key."""

    missing_keys: list[str] = field(default_factory=list)  # in the backbone, not in the file
    unexpected_keys: list[str] = field(default_factory=list)  # in the file, not in the backbone
    ignored_keys: list[str] = field(default_factory=list)  # file keys of other parts (fc, head)
    # ViT position embeddings interpolated from the file's image size to the model's (the crop)
    resized_keys: list[str] = field(default_factory=list)


def load_pretrained_backbone(
    backbone: nn.Module, arch: str, pretrained: str | os.PathLike
) -> BackboneLoadReport:
    """Load "imagenet" (torchvision's DEFAULT weights), "timm" (a timm arch's tag weights) or a
    local checkpoint (a torch file, or `.safetensors`) into a trunk of `build_model`
    (`model.backbone`)."""
    if is_timm_arch(arch):
        return _timm_backbone().load_pretrained(backbone, arch, pretrained)
    if pretrained == "timm":
        raise ValueError(f"pretrained: 'timm' loads the weights of a timm arch (\"{TIMM_PREFIX}NAME.TAG\"); "
                         f"for torchvision's {arch} use \"imagenet\" or a checkpoint path")
    if pretrained == "imagenet":
        weights = imagenet_weights(arch)
        return load_backbone_state(backbone, imagenet_state_dict(arch), f"torchvision {weights}")
    return load_backbone_state(backbone, read_state_dict(pretrained), os.fspath(pretrained))


def imagenet_weights(arch: str) -> torchvision.models.WeightsEnum:
    """torchvision's DEFAULT (best published ImageNet) weights of `arch`, e.g.
    ResNet50_Weights.IMAGENET1K_V2, ConvNeXt_Tiny_Weights.IMAGENET1K_V1."""
    check_backbone(arch)
    if is_timm_arch(arch):
        raise ValueError(f"pretrained: {arch} is a timm model: its weights are pretrained = \"timm\", "
                         "not torchvision's \"imagenet\"")
    return torchvision.models.get_model_weights(arch).DEFAULT


class WeightsUnavailable(OSError, RuntimeError):
    """Pretrained weights that could not be fetched (an OSError: launchers report it in one line)."""


class MissingExtra(ImportError, ValueError):
    """An optional package (timm, safetensors) that is not installed; the message is one line with
    the pip command. A ValueError too, so the configuration check reports it as a refused value."""


def imagenet_state_dict(arch: str) -> dict[str, torch.Tensor]:
    """torchvision's ImageNet weights for `arch`, from torch's hub cache or the network."""
    weights = imagenet_weights(arch)
    try:
        return torch.hub.load_state_dict_from_url(
            weights.url, map_location="cpu", progress=False, check_hash=True, weights_only=True
        )
    except Exception as error:  # no network, proxy, corrupt download: all end the same way
        file_name = os.path.basename(weights.url)
        raise WeightsUnavailable(
            f"could not download torchvision's {arch} ImageNet weights ({weights}) from "
            f"{weights.url}: {type(error).__name__}: {error}. Without network access, copy that "
            f"file here from a machine that has it and pass its path instead: "
            f"pretrained=/path/to/{file_name}"
        ) from error


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A checkpoint file -> its flat {key: tensor} state dict, loaded with weights_only=True.

    Accepts a plain state dict or one wrapped under "state_dict" (mmpretrain, Lightning, timm),
    "model" (this project's snapshots, many others) or "teacher" (DINO: the teacher is what DINO
    evaluates and publishes); other top-level entries are ignored. A `.safetensors` file (the
    Hugging Face Hub's format) is read with the safetensors package, an optional extra.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    if path.endswith(".safetensors"):
        return _read_safetensors(path)
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


def _read_safetensors(path: str) -> dict[str, torch.Tensor]:
    try:
        safetensors_torch = importlib.import_module("safetensors.torch")
    except ImportError:
        # An ImportError and a ValueError: one line, like the other refused values.
        raise MissingExtra(
            f"{path}: reading .safetensors files needs safetensors, an optional extra that is not "
            "installed: pip install safetensors"
        ) from None
    try:
        state = safetensors_torch.load_file(path, device="cpu")
    except Exception as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise DataError(f"{path}: not a readable safetensors file ({type(error).__name__}: {reason})") from None
    if not state:
        raise DataError(f"{path}: a safetensors file without tensors")
    return state


def _unwrap_state_dict(checkpoint: object) -> object:
    for wrapper in ("state_dict", "model", "teacher"):
        if isinstance(checkpoint, dict) and isinstance(checkpoint.get(wrapper), dict):
            return _unwrap_state_dict(checkpoint[wrapper])
    return checkpoint


def load_backbone_state(
    backbone: nn.Module, state: dict[str, torch.Tensor], source: str
) -> BackboneLoadReport:
    """Load backbone weights from a torchvision, DDP-wrapped or full-model state dict.

    Keys with a `backbone.` prefix are the trunk when any key has one (other keys, e.g. `head.*`,
    belong to other parts); otherwise keys are plain torchvision names and the classification
    layers the trunk does not hold (`fc.*`, `classifier.*`, `head.*`, `heads.*`) are dropped.
    A ViT's position embedding is interpolated to the model's image size when the file's was
    made for another (torchvision's weights: 224 px). Other shapes must match; missing and
    unexpected keys are reported (returned and warned once).
    """
    expected = backbone.state_dict()
    trunk_state, ignored = _select_backbone_keys(state, source, set(expected))
    resized = []
    for key, (source_key, tensor) in trunk_state.items():
        fitted = fit_position_embedding(backbone, key, tensor, source)
        if fitted is not tensor:
            trunk_state[key] = (source_key, fitted)
            resized.append(key)
        elif key in expected and expected[key].shape != tensor.shape:
            raise DataError(
                f"{source}: {source_key!r} has shape {tuple(tensor.shape)}, but the backbone's "
                f"{key!r} has shape {tuple(expected[key].shape)} (a different architecture?)"
            )
    return load_selected_keys(backbone, trunk_state, ignored, resized, source)


def load_selected_keys(
    backbone: nn.Module, trunk_state: dict[str, tuple[str, torch.Tensor]], ignored: list[str],
    resized: list[str], source: str,
) -> BackboneLoadReport:
    """Load {backbone key: (file key, tensor)} non-strictly (shapes checked by the caller) and
    report, with a warning, what is missing or unexpected. The p of a GeM inside the backbone (a
    timm trunk's pool) is the project's, not a file's, and never counts as missing."""
    result = backbone.load_state_dict(
        {key: tensor for key, (_, tensor) in trunk_state.items()}, strict=False
    )
    report = BackboneLoadReport(
        sorted(set(result.missing_keys) - gem_keys(backbone)), sorted(result.unexpected_keys), ignored, resized
    )
    if report.missing_keys or report.unexpected_keys:
        warnings.warn(
            f"{source}: backbone weights loaded with {len(report.missing_keys)} missing keys "
            f"{_preview(report.missing_keys)} and {len(report.unexpected_keys)} unexpected keys "
            f"{_preview(report.unexpected_keys)}",
            stacklevel=3,
        )
    return report


def gem_keys(backbone: nn.Module) -> set[str]:
    """The p of each GeM inside `backbone` (a timm trunk's pool): weights no file holds."""
    return {f"{name}.p" for name, module in backbone.named_modules() if isinstance(module, GeM)}


def fit_position_embedding(
    backbone: nn.Module, key: str, tensor: torch.Tensor, source: str
) -> torch.Tensor:
    """A ViT's `encoder.pos_embedding` (key relative to the backbone) made for another image size,
    interpolated to the backbone's (bicubic on the grid of patches, torchvision's
    interpolate_embeddings; the class token's entry is kept); any other tensor as it is. A timm
    ViT's `pos_embed` is resampled as timm resamples it (arcface/timm_backbone.py)."""
    if is_timm_model(backbone):
        return _timm_backbone().fit_position_embedding(backbone, key, tensor, source)
    if not isinstance(backbone, VisionTransformer) or key != "encoder.pos_embedding":
        return tensor
    wanted = backbone.encoder.pos_embedding.shape  # (1, 1 + (S / patch)^2, C)
    if tensor.shape == wanted or tensor.dim() != 3 or tensor.shape[2] != wanted[2]:
        return tensor  # fits, or of another width: the shape check names it
    try:
        state = interpolate_embeddings(
            backbone.image_size, backbone.patch_size, OrderedDict({key: tensor})
        )
    except ValueError as error:
        raise DataError(f"{source}: {key!r} of shape {tuple(tensor.shape)}: {error}") from None
    return state[key]


def _select_backbone_keys(
    state: dict[str, torch.Tensor], source: str, trunk_keys: set[str]
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
        classifier = trunk_key.startswith(_CLASSIFIER_PREFIXES) and trunk_key not in trunk_keys
        if has_prefix and prefix is None or classifier:
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
