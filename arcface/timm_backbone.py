"""timm backbones: `arch = "timm/NAME"` or `"timm/NAME.TAG"` (e.g. timm/vit_small_patch16_224.dino,
timm/vit_base_patch16_clip_224.openai, timm/vit_base_patch14_dinov2.lvd142m, timm/convnext_base.fb_in22k).

NAME is any `timm.list_models()` name; TAG one of its pretrained tags (default: timm's default tag),
which chooses the weights `pretrained = "timm"` fetches and the preprocessing ("timm/NAME.TAG" is
usually also the weights' Hugging Face Hub id). timm is an optional extra (pip install timm): nothing here
imports it until a timm arch is used.

The trunk is timm's model itself, built with `num_classes=0`, so its state-dict keys are timm's
under `backbone.` and its output is timm's pooled pre-logits feature,
`forward_head(forward_features(x), pre_logits=True)`: the class token after the final norm for
CLIP and DINO ViTs, the attention-pooled token for SigLIP, the normalised average of the map for
ConvNeXt. The RetrievalModel's neck is then an identity; `embedding_dim` adds the projection as for
the torchvision trunks. The crop goes to the model as `img_size` where it takes one (ViTs and other
models with position embeddings, which are made for that grid), and `drop_path` as timm's
`drop_path_rate` (stochastic depth; None leaves timm's default).

Pooling: "avg" is the model's own pooling (timm's `global_pool`). "gem" replaces the model's global
average pool over its feature map (timm's SelectAdaptivePool2d: ResNet, EfficientNet, ConvNeXt,
RegNet, MobileNet, Swin, ...) with GeM, keeping what follows it (ConvNeXt's head norm, MobileNet-V3's
conv head); p is then the backbone's `...global_pool.p`. Models that pool tokens (ViTs, whose class
token, MAP or token mean is not a map average) or pool otherwise (CLIP's attention pool) take "avg"
only. GeM clamps at eps, as for the torchvision trunks: a ConvNeXt or Swin map, unlike a ReLU
network's, is not non-negative.
"""

from __future__ import annotations

import difflib
import functools
import importlib
import os
import re
import sys
from dataclasses import dataclass
from types import ModuleType

import torch
from torch import nn

from arcface.model import (_CLASSIFIER_PREFIXES, POOLINGS, TIMM_PREFIX, BackboneLoadReport, GeM, MissingExtra,
                           WeightsUnavailable, _strip_wrappers, gem_keys, load_selected_keys, read_state_dict)
from arcface.textfile import DataError
from arcface.transforms import Preprocessing

PREFIX = TIMM_PREFIX
# Offered when a refused name has no close timm name.
_EXAMPLES = "e.g. 'timm/vit_small_patch16_224.dino' or 'timm/convnext_tiny'"
# Classification layers of timm models that a file may hold and a num_classes=0 trunk does not:
# the torchvision names (timm uses the same) and DeiT's distillation head.
_TIMM_CLASSIFIER_PREFIXES = (*_CLASSIFIER_PREFIXES, "head_dist.")
# timm's ways of pooling tokens (`global_pool` of ViT-like models), for the GeM refusal.
_TOKEN_POOLS = {"token": "one token (a class token, or an attention pool's)", "map": "attention pooling (MAP)",
                "avg": "the mean of its tokens", "avgmax": "the mean and max of its tokens",
                "max": "the max of its tokens"}


def _timm(arch: str) -> ModuleType:
    """timm, imported on first use; MissingExtra naming `arch` when it is not installed."""
    try:
        return importlib.import_module("timm")
    except ImportError:
        raise MissingExtra(
            f"arch: {arch!r} needs timm, an optional extra that is not installed: pip install timm"
        ) from None


@dataclass(frozen=True)
class TimmArch:
    """A parsed "timm/NAME[.TAG]"."""

    arch: str
    name: str  # a timm.list_models() name
    tag: str  # "" for timm's default tag

    @property
    def model_name(self) -> str:
        """What timm.create_model takes: "NAME.TAG", or "NAME"."""
        return f"{self.name}.{self.tag}" if self.tag else self.name


def parse_arch(arch: str) -> TimmArch:
    """"timm/NAME[.TAG]" -> TimmArch; a one-line ValueError naming `arch` when timm has no such
    model (with the closest names) or no such tag (with the model's tags)."""
    timm = _timm(arch)
    name, _, tag = arch[len(PREFIX):].partition(".")
    if not name:
        raise ValueError(f"arch: {arch!r} names no timm model; expected timm/NAME or timm/NAME.TAG, {_EXAMPLES}")
    if not timm.is_model(name):
        close = difflib.get_close_matches(name.lower(), timm.list_models(), n=3, cutoff=0.6)
        hint = (f"did you mean {_alternatives([PREFIX + c for c in close])}?" if close
                else f"{_EXAMPLES}")
        raise ValueError(
            f"arch: {arch!r} is not a timm model; {hint} (python -c 'import timm; "
            f"print(*timm.list_models(\"{name[:3]}*\"))' lists the names starting as this one)"
        )
    if tag:
        try:
            timm.models.get_pretrained_cfg(f"{name}.{tag}")
        except RuntimeError:  # timm's "Invalid pretrained tag"
            tags = [model.partition(".")[2] for model in timm.list_pretrained(f"{name}.*")]
            close = difflib.get_close_matches(tag.lower(), tags, n=3, cutoff=0.6)
            hint = (f"did you mean {_alternatives([f'{PREFIX}{name}.{t}' for t in close])}?" if close
                    else f"its tags: {', '.join(tags[:8])}{', ...' if len(tags) > 8 else ''}" if tags
                    else f"it has none: use {PREFIX}{name}")
            raise ValueError(f"arch: {arch!r}: timm's {name} has no pretrained tag {tag!r}; {hint}") from None
    return TimmArch(arch, name, tag)


def _alternatives(names: list[str]) -> str:
    quoted = list(map(repr, names))
    return f"{', '.join(quoted[:-1]) + ' or ' if len(quoted) > 1 else ''}{quoted[-1]}"


# ------------------------------------------------------------------------------------------------
# What a model takes and gives, found by building it on the meta device (shapes, no memory)


@dataclass(frozen=True)
class _Probe:
    pooled_dim: int  # width of the pooled pre-logits feature
    takes_img_size: bool
    takes_drop_path: bool
    patch_size: tuple[int, int] | None  # of a model that takes img_size and cuts patches
    gem_pool: str | None  # the global average pool GeM can replace, by module path
    pooling: str  # how the model pools, for messages
    layered: bool  # says where its blocks are (layer decay can run over them)


class _Unbuildable(Exception):
    """timm could not build or run the model at the asked image size."""


@functools.lru_cache(maxsize=64)
def _probe(model_name: str, image_size: int) -> _Probe:
    """Build `model_name` for `image_size` and run one image through it, on the meta device (or on
    the CPU for a model the meta device cannot run); _Unbuildable with timm's reason if it fails."""
    failure = None
    for device in ("meta", "cpu"):
        try:
            with torch.device(device), torch.no_grad():
                model, accepted = _create(model_name, {"img_size": image_size, "drop_path_rate": 0.0})
                model.eval()  # batch norm of one image on a 1 x 1 map is refused in training mode
                gem_pool = _gem_pool_path(model)
                shapes = _record_shapes(model, gem_pool)
                features = model.forward_features(torch.zeros(1, 3, image_size, image_size))
                pooled = model.forward_head(features, pre_logits=True)
            if gem_pool is not None and not (len(shapes) == 2 and _gem_fits(model, gem_pool, *shapes)):
                gem_pool = None  # the pool did not run, or GeM cannot give its output
            break
        except Exception as error:  # a too-small crop, or an op the meta device lacks: retry on the CPU
            failure = error
    else:
        raise _Unbuildable(_first_line(failure))
    if pooled.dim() != 2:
        raise _Unbuildable(f"its pooled feature has shape {tuple(pooled.shape)}, not (N, C)")
    patch = getattr(getattr(model, "patch_embed", None), "patch_size", None)
    if isinstance(patch, int):
        patch = (patch, patch)
    token_pool = getattr(model, "global_pool", None)
    pooling = (f"pools {_TOKEN_POOLS.get(token_pool, repr(token_pool))} (global_pool={token_pool!r})"
               if isinstance(token_pool, str) and gem_pool is None else "has no global average pool GeM can replace")
    keys = layer_keys(model)
    layered = keys is not None and any(key is not None for key in keys.values())
    return _Probe(pooled.shape[1], "img_size" in accepted, "drop_path_rate" in accepted,
                  tuple(patch) if patch and "img_size" in accepted else None, gem_pool, pooling, layered)


def _create(model_name: str, optional: dict[str, object], **kwargs: object) -> tuple[nn.Module, set[str]]:
    """timm.create_model(model_name, num_classes=0) with those of `optional` the model takes (timm
    passes them to the model's constructor, which names the one it does not take)."""
    timm = _timm(PREFIX + model_name)
    optional = dict(optional)
    while True:
        try:
            model = timm.create_model(model_name, num_classes=0, **optional, **kwargs)
            return model, set(optional)
        except TypeError as error:
            rejected = next((key for key in optional if f"'{key}'" in str(error)), None)
            if rejected is None:
                raise
            del optional[rejected]


def _record_shapes(model: nn.Module, path: str | None) -> list[torch.Size]:
    """[input shape, output shape] of the module at `path` once the model has run (empty if None)."""
    shapes: list[torch.Size] = []
    if path is not None:
        model.get_submodule(path).register_forward_hook(
            lambda module, args, output: shapes.extend([args[0].shape, output.shape]))
    return shapes


def _gem_fits(model: nn.Module, path: str, pool_input: torch.Size, pool_output: torch.Size) -> bool:
    """Whether GeM in place of the pool at `path` gives what it gave (GeM runs on the CPU: its
    float32 guard, autocast, has no meta device)."""
    gem = _use_gem(model, path).get_submodule(path).to("cpu")
    try:
        with torch.no_grad():
            return gem(torch.ones(pool_input)).shape == pool_output
    except RuntimeError:
        return False


def _gem_pool_path(model: nn.Module) -> str | None:
    """The module path of the model's one global average pool over a map, if it has exactly one."""
    from timm.layers import SelectAdaptivePool2d

    pools = [name for name, module in model.named_modules()
             if isinstance(module, SelectAdaptivePool2d) and module.pool_type in ("avg", "fast", "fastavg")]
    return pools[0] if len(pools) == 1 else None


class GlobalGeM(GeM):
    """GeM in place of a timm global average pool: the same input layout (NCHW, or NHWC for Swin)
    and output shape ((N, C), or (N, C, 1, 1) where a norm or conv head follows) as the pool."""

    def __init__(self, channels_last: bool, flatten: bool) -> None:
        super().__init__()
        self.channels_last = channels_last
        self.flatten = flatten

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            x = x.permute(0, 3, 1, 2)  # (N, H, W, C) -> (N, C, H, W)
        pooled = super().forward(x)  # (N, C)
        return pooled if self.flatten else pooled[:, :, None, None]


def _use_gem(model: nn.Module, path: str) -> nn.Module:
    """Replace the SelectAdaptivePool2d at `path` with GlobalGeM; returns the model."""
    pool = model.get_submodule(path)
    # timm's fast pools (all NHWC ones) average over `dim` and flatten themselves.
    channels_last = tuple(getattr(pool.pool, "dim", (2, 3))) == (1, 2)
    flatten = isinstance(pool.flatten, nn.Flatten) or getattr(pool.pool, "flatten", False) is True
    parent, _, leaf = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, GlobalGeM(channels_last, flatten))
    return model


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0]}" if text else type(error).__name__


# ------------------------------------------------------------------------------------------------
# Checking and building


def check(arch: str, pooling: str = "avg", image_size: int = 224, drop_path: float | None = None) -> None:
    """A one-line ValueError naming the key (arch, pooling, crop, drop_path) that `build` cannot use.
    Builds the model on the meta device once per (arch, crop) (no weights, no compute)."""
    spec = parse_arch(arch)
    if pooling not in POOLINGS:
        raise ValueError(f"pooling: expected {' or '.join(map(repr, POOLINGS))}, got {pooling!r}")
    try:
        probe = _probe(spec.model_name, image_size)
    except _Unbuildable as reason:
        raise ValueError(f"crop: timm cannot build {arch} for {image_size} x {image_size} images ({reason})") from None
    if probe.patch_size and (image_size % probe.patch_size[0] or image_size % probe.patch_size[1]):
        patch = max(probe.patch_size)
        below, above = image_size // patch * patch, (image_size // patch + 1) * patch
        raise ValueError(
            f"crop: {arch} cuts images into {probe.patch_size[0]} x {probe.patch_size[1]} patches, so the "
            f"crop must be a multiple of {patch}; got {image_size} (e.g. crop = "
            f"{f'{below} or {above}' if below else above})"
        )
    if pooling == "gem" and probe.gem_pool is None:
        raise ValueError(
            f"pooling: 'gem' replaces a global average pool over a feature map, but {arch} "
            f"{probe.pooling}: use pooling = \"avg\" (the model's own pooling)"
        )
    if drop_path and not probe.takes_drop_path:
        raise ValueError(f"drop_path: {arch} has no stochastic depth (timm's drop_path_rate); "
                         f"use drop_path = 0, got {drop_path}")


def build(arch: str, pooling: str = "avg", image_size: int = 224,
          drop_path: float | None = None) -> tuple[nn.Module, int]:
    """The trunk (timm's model, random weights, num_classes=0) and the width of its pooled feature."""
    check(arch, pooling, image_size, drop_path)
    spec = parse_arch(arch)
    probe = _probe(spec.model_name, image_size)
    kwargs: dict[str, object] = {}
    if probe.takes_img_size:
        kwargs["img_size"] = image_size
    if drop_path is not None and probe.takes_drop_path:
        kwargs["drop_path_rate"] = drop_path
    model, _ = _create(spec.model_name, {}, pretrained=False, **kwargs)
    if pooling == "gem":
        _use_gem(model, probe.gem_pool)
    return model, probe.pooled_dim


def has_layers(arch: str, image_size: int = 224) -> bool:
    """Whether the timm model of `arch` says where its blocks are (layer decay can run over them)."""
    return _probe(parse_arch(arch).model_name, image_size).layered


# timm's marker (MATCH_PREV_GROUP) for parameters that join the group before them: its models put
# their final norm into the last block with it.
_WITH_PREVIOUS = (99999,)


def layer_keys(model: nn.Module) -> dict[str, tuple[float, ...] | None] | None:
    """{parameter name: layer key} from the model's group_matcher(coarse=False), or None when it
    has no such matcher. A key is (group ordinal, numbers the pattern captured..., suffix), sorted
    input to output as timm sorts them: (0, ...) the stem, (1, ...) the blocks; None for what
    follows the blocks (parameters no pattern takes, and the final norms timm adds to the last
    block). Patterns are tried in order and anchored at the start of the name, as timm does."""
    matcher = getattr(model, "group_matcher", None)
    spec = matcher(coarse=False) if callable(matcher) else None
    if not isinstance(spec, dict):
        return None
    rules = []
    for ordinal, entries in enumerate(spec.values()):
        for pattern, suffix in ([(entries, None)] if isinstance(entries, str) else entries or ()):
            rules.append((re.compile(pattern), ordinal, tuple(suffix or ())))
    keys: dict[str, tuple[float, ...] | None] = {}
    for name, _ in model.named_parameters():
        rule = next(((match, ordinal, suffix) for pattern, ordinal, suffix in rules
                     if (match := pattern.match(name))), None)
        if rule is None or rule[2] == _WITH_PREVIOUS:
            keys[name] = None
            continue
        match, ordinal, suffix = rule
        numbers = [float(group) for group in match.groups() if group is not None]
        keys[name] = (float(ordinal), *numbers, *map(float, suffix))
    return keys


def preprocessing(arch: str) -> Preprocessing:
    """The mean, std and interpolation of the weights `arch` names (timm's pretrained configuration
    of the tag, or of the default tag, through resolve_data_config): CLIP's own statistics for CLIP
    models, 0.5 for SigLIP, ImageNet's for most others; mostly bicubic."""
    spec = parse_arch(arch)
    timm = _timm(arch)
    cfg = timm.models.get_pretrained_cfg(spec.model_name)
    if cfg is None:  # a model without a registered configuration: timm's defaults
        from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
        return Preprocessing(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, "bicubic")
    data = timm.data.resolve_data_config(pretrained_cfg=cfg.to_dict())
    return Preprocessing(tuple(data["mean"]), tuple(data["std"]), data["interpolation"])


# ------------------------------------------------------------------------------------------------
# Weights


def load_pretrained(backbone: nn.Module, arch: str, pretrained: str | os.PathLike) -> BackboneLoadReport:
    """Load "timm" (the tag's weights, through timm and the Hugging Face Hub) or a local checkpoint
    (`.safetensors` or a torch file) into a trunk `build` made.

    A file's trunk is found under the prefixes of the usual wrappers: `module.` / `_orig_mod.`
    (DDP, torch.compile); `teacher.` (or `student.` alone) of DINO / DINOv2 training checkpoints,
    the teacher being what DINO evaluates and publishes; `backbone.` (DINO, this project's snapshots;
    other keys such as DINO's `head.` are ignored); `model.` when every key has it (Lightning-style
    wrappers); `state_dict` / `model` / `teacher` dict wrappers. Files in another layout are passed
    through timm's own conversion of the model's module (`checkpoint_filter_fn`, what timm applies
    to its hub weights): for ViTs it maps OpenAI CLIP / open_clip's own ViT naming (`visual.conv1`,
    `visual.transformer.resblocks.*`; CLIP's projection `visual.proj` becomes the classifier, which
    the num_classes=0 trunk leaves out), open_clip's timm trunks (`visual.trunk.`), the original
    DINOv2 release (`mask_token`, `w12`), for CLIP ResNets OpenAI's naming, and it resamples
    position and patch embeddings to the model's grid; what is left under `visual.trunk.` or
    `visual.` is then taken as timm's layout. What timm has no conversion for (e.g. DINOv2's
    chunked `blocks.0.3.*` training layout) shows up as missing and unexpected keys; the keys a
    conversion drops (a CLIP file's text tower) are not listed. A file that fits no key of the
    model, or a key of another shape, is refused in one line naming the key (the first in the
    model's order) and both shapes.
    """
    if pretrained == "timm":
        spec = parse_arch(arch)
        return load_state(backbone, _hub_state(spec), f"timm's {spec.model_name} weights")
    if pretrained == "imagenet":
        raise ValueError(f"pretrained: 'imagenet' means torchvision's weights; for {arch} use "
                         'pretrained = "timm" (the weights of its tag) or a checkpoint path')
    return load_state(backbone, read_state_dict(pretrained), os.fspath(pretrained))


def _hub_state(spec: TimmArch) -> dict[str, torch.Tensor]:
    """The weights of `spec`'s tag, as timm loads them into a model at its pretrained image size."""
    timm = _timm(spec.arch)
    cfg = timm.models.get_pretrained_cfg(spec.model_name)
    where = cfg and (cfg.hf_hub_id or cfg.url or cfg.file)
    if not where:
        tags = timm.list_pretrained(f"{spec.name}.*")
        raise ValueError(f"pretrained: timm has no weights for {spec.model_name}"
                         f"{'; tags with weights: ' + ', '.join(tags[:5]) if tags else ''}")
    try:
        model, _ = _create(spec.model_name, {}, pretrained=True)
    except Exception as error:  # no network, offline mode, proxy, missing file: all end the same way
        raise WeightsUnavailable(
            f"could not fetch timm's weights for {spec.model_name} (from {where}): "
            f"{_first_line(error).rstrip('.')}. "
            f"{_offline_note()} Without network access, copy the weights file (e.g. the hub's "
            "model.safetensors) from a machine that has it and pass its path: pretrained=/path/to/model.safetensors"
        ) from None
    return model.state_dict()


def _offline_note() -> str:
    constants = sys.modules.get("huggingface_hub.constants")
    offline = getattr(constants, "HF_HUB_OFFLINE", None)
    if offline is None:
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    if offline:
        return "HF_HUB_OFFLINE is set, so only the Hugging Face cache (HF_HOME) was read."
    return "Where there is no network, set HF_HUB_OFFLINE=1 to read only the Hugging Face cache (HF_HOME)."


def load_state(backbone: nn.Module, state: dict[str, torch.Tensor], source: str) -> BackboneLoadReport:
    """Load a checkpoint's state dict into a timm trunk (see load_pretrained for the layouts)."""
    expected = backbone.state_dict()
    selected, ignored = _select_trunk(state, source)
    converted = _convert(backbone, {key: tensor for key, (_, tensor) in selected.items()}, expected)
    trunk_state, resized = {}, []
    for key, tensor in converted.items():
        source_key, original = selected.get(key, (key, tensor))
        if key in expected and original.shape != tensor.shape:
            resized.append(key)  # timm's conversion resampled it to the model's grid
        trunk_state[key] = (source_key, tensor)
    outside = [key for key in trunk_state if key not in expected]
    ignored += [trunk_state.pop(key)[0] for key in outside if key.startswith(_TIMM_CLASSIFIER_PREFIXES)]
    if not any(key in expected for key in trunk_state):
        first = next(iter(trunk_state), None)
        raise DataError(
            f"{source}: no key fits the backbone (the file's first {first!r}, the backbone's first "
            f"{next(iter(expected))!r}): a checkpoint of another architecture or layout?"
        )
    for key in (key for key in expected if key in trunk_state):  # the model's order, not the file's
        source_key, tensor = trunk_state[key]
        original = selected.get(key, (None, tensor))[1]  # name the file's shape, not a resampled one
        if tensor.shape != expected[key].shape:
            raise DataError(
                f"{source}: {source_key!r} has shape {tuple(original.shape)}, but the backbone's "
                f"{key!r} has shape {tuple(expected[key].shape)} (a different architecture?)"
            )
    return load_selected_keys(backbone, trunk_state, sorted(ignored), sorted(resized), source)


def _select_trunk(state: dict[str, torch.Tensor], source: str
                  ) -> tuple[dict[str, tuple[str, torch.Tensor]], list[str]]:
    """-> ({key without wrapper prefixes: (file key, tensor)}, file keys of other parts)."""
    keys = {_strip_wrappers(key): key for key in state}
    if len(keys) != len(state):
        raise DataError(f"{source}: keys collide once 'module.'/'_orig_mod.' prefixes are removed")
    ignored = []
    for prefixes in (("teacher.", "student."), ("backbone.",)):
        prefix = next((p for p in prefixes if any(key.startswith(p) for key in keys)), None)
        if prefix is not None:
            ignored += [keys[key] for key in keys if not key.startswith(prefix)]
            # DINO's student is DDP-wrapped inside: student.module.backbone.*
            keys = {_strip_wrappers(key[len(prefix):]): source_key for key, source_key in keys.items()
                    if key.startswith(prefix)}
    if keys and all(key.startswith("model.") for key in keys):
        keys = {key[len("model."):]: source_key for key, source_key in keys.items()}
    return {key: (source_key, state[source_key]) for key, source_key in keys.items()}, ignored


def _convert(backbone: nn.Module, state: dict[str, torch.Tensor],
             expected: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state` in the model's layout and grid: as it is when it fits, else through timm's conversion
    for the model's module, then under `visual.trunk.` / `visual.` (a CLIP model's image tower)."""
    own = gem_keys(backbone)
    if all(key in state and state[key].shape == tensor.shape for key, tensor in expected.items()
           if key not in own):
        return state
    filter_fn = getattr(sys.modules.get(type(backbone).__module__), "checkpoint_filter_fn", None)
    if filter_fn is not None:
        try:
            state = filter_fn(dict(state), backbone)
        except Exception:  # a file of another architecture: the shape check names the key
            pass
    if not any(key in expected for key in state):
        for prefix in ("visual.trunk.", "visual."):
            if any(key.startswith(prefix) for key in state):
                return {key[len(prefix):]: t for key, t in state.items() if key.startswith(prefix)}
    return state


def fit_position_embedding(backbone: nn.Module, key: str, tensor: torch.Tensor, source: str) -> torch.Tensor:
    """A timm ViT's `pos_embed` made for another image size, resampled to the backbone's grid as
    timm resamples it (bicubic, antialiased; the prefix tokens' entries kept); anything else as it is."""
    wanted = getattr(backbone, "pos_embed", None)
    if key != "pos_embed" or not isinstance(wanted, torch.Tensor) or tensor.shape == wanted.shape:
        return tensor
    if tensor.dim() != 3 or tensor.shape[2] != wanted.shape[2]:
        return tensor  # of another width: the shape check names it
    from timm.layers import resample_abs_pos_embed

    prefix_tokens = 0 if getattr(backbone, "no_embed_class", False) else getattr(backbone, "num_prefix_tokens", 1)
    try:
        return resample_abs_pos_embed(tensor, list(backbone.patch_embed.grid_size), num_prefix_tokens=prefix_tokens)
    except Exception as error:
        raise DataError(f"{source}: {key!r} of shape {tuple(tensor.shape)}: {_first_line(error)}") from None
