"""The optimizer's parameter groups: which parameters decay, and each one's learning-rate scale.

Every parameter of a RetrievalModel gets two numbers; parameters with the same two share a group
(in the order they first appear in `model.named_parameters()`, each group's parameters in model
order), so the default settings give one group of every parameter, as a plain optimizer does.

  weight decay  `weight_decay` for every parameter (decay_norm_and_bias = true, the reference
                recipe). With false, 0 for biases, normalisation weights, GeM's p and every other
                1-d parameter, position embeddings, class and register tokens, Swin's relative
                position tables and Swin-V2's logit scales (timm's `no_weight_decay()` names for a
                timm trunk), as the BEiT, MAE, DINO and CLIP fine-tuning recipes do.
  lr scale      each step's learning rate times:
                  the ArcFace head (`head.*`: the class centres, dense or a Partial FC shard):
                    head_lr_mult;
                  the trunk (`backbone.*`) with layer_decay d < 1, cut into its stem, L blocks and
                    what follows them (BEiT's and MAE's layer ids 0 .. L+1): the stem
                    d^(L+1), block i = 1 .. L (input to output) d^(L+1-i), what follows the last
                    block (final norms) 1;
                  everything else (the trunk when d = 1, pooling, the embedding projection): 1.

What a block is: for a timm trunk, what timm's own `group_matcher(coarse=False)` says (the
grouping timm's layer-decay optimizer uses): ViT-like models their `blocks.i`, ConvNeXt and Swin
each block of each stage, with a stage's downsampling layer in its first block; timm puts the final
norm into the last block, here it is what follows the blocks (MAE's rule). For torchvision trunks:
ViT's `encoder.layers.encoder_layer_i` after its stem (`conv_proj`, `class_token`,
`encoder.pos_embedding`); ConvNeXt's and Swin's blocks of `features.1/3/5/7` after the stem
`features.0`, the downsampling `features.2/4/6` in the block after it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from torch import nn
from torchvision.models.convnext import CNBlock
from torchvision.models.swin_transformer import SwinTransformerBlock
from torchvision.models.vision_transformer import VisionTransformer

from arcface.model import _timm_backbone, family_of, is_timm_arch, is_timm_model

# The optimizers job.make_optimizer builds over these groups (the `optimizer` setting).
OPTIMIZERS = ("sgd", "adamw")
# The torchvision families whose blocks layer decay knows.
LAYERED_FAMILIES = ("ViT", "ConvNeXt", "Swin", "Swin-V2")
# torchvision trunk parameters that are not weights in the decaying sense (all more than 1-d).
_NO_DECAY_NAME = re.compile(r"(^|\.)(class_token|pos_embedding|relative_position_bias_table|logit_scale)$")

# A layer key orders a trunk's parameters from input to output: (0,) the stem, (1, ...) a block;
# None is what follows the last block.
LayerKey = tuple[float, ...] | None


def param_groups(model: nn.Module, weight_decay: float, decay_norm_and_bias: bool = True,
                 layer_decay: float = 1.0, head_lr_mult: float = 1.0) -> list[dict]:
    """The parameter groups of `model` (module docstring): dicts of "params", "weight_decay" and
    "lr_scale", which the Trainer multiplies with each step's learning rate. ValueError naming
    layer_decay when d < 1 and the model's trunk has no blocks this module knows."""
    scales = trunk_lr_scales(model, layer_decay) if layer_decay != 1 else {}
    spared = set() if decay_norm_and_bias else no_decay_names(model)
    groups: dict[tuple[float, float], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        scale = head_lr_mult if name.startswith("head.") else scales.get(name, 1.0)
        decay = 0.0 if name in spared else weight_decay
        groups.setdefault((decay, scale), []).append(param)
    return [{"params": params, "weight_decay": decay, "lr_scale": scale}
            for (decay, scale), params in groups.items()]


def no_decay_names(model: nn.Module) -> set[str]:
    """Names of the parameters that decay_norm_and_bias = false spares."""
    names = {name for name, param in model.named_parameters() if param.ndim <= 1 or _NO_DECAY_NAME.search(name)}
    backbone = getattr(model, "backbone", None)
    if backbone is not None and is_timm_model(backbone) and hasattr(backbone, "no_weight_decay"):
        names |= {f"backbone.{name}" for name in backbone.no_weight_decay()}
    return names


def trunk_lr_scales(model: nn.Module, layer_decay: float) -> dict[str, float]:
    """{parameter name: d^(L+1-id)} for the trunk's parameters (module docstring)."""
    backbone = getattr(model, "backbone", None)
    keys = trunk_layer_keys(backbone) if backbone is not None else None
    if keys is None or not any(key is not None for key in keys.values()):
        raise ValueError(f"layer_decay: the model's trunk ({type(backbone).__name__}) has no blocks layer "
                         f"decay knows (a ViT, ConvNeXt or Swin, or a timm model); use layer_decay = 1, got "
                         f"{layer_decay}")
    ids = {key: index for index, key in enumerate(sorted({key for key in keys.values() if key is not None}))}
    top = len(ids)  # L + 1 with a stem: the id of what follows the last block
    return {f"backbone.{name}": 1.0 if key is None else layer_decay ** (top - ids[key])
            for name, key in keys.items()}


def trunk_layer_keys(backbone: nn.Module) -> dict[str, LayerKey] | None:
    """{trunk parameter name: its layer key}, or None for a trunk without known blocks."""
    if is_timm_model(backbone):
        return _timm_backbone().layer_keys(backbone)
    if isinstance(backbone, VisionTransformer):
        return {name: _torchvision_vit_key(name) for name, _ in backbone.named_parameters()}
    features = getattr(backbone, "features", None)
    if isinstance(features, nn.Sequential) and _holds(features, (CNBlock, SwinTransformerBlock)):
        return {name: _staged_key(name) for name, _ in backbone.named_parameters()}
    return None


def _holds(module: nn.Module, kinds: tuple[type, ...]) -> bool:
    return any(isinstance(child, kinds) for child in module.modules())


def _torchvision_vit_key(name: str) -> LayerKey:
    if name in ("class_token", "encoder.pos_embedding") or name.startswith("conv_proj."):
        return (0.0,)
    block = re.match(r"encoder\.layers\.encoder_layer_(\d+)\.", name)
    return (1.0, float(block[1])) if block else None


def _staged_key(name: str) -> LayerKey:
    """torchvision ConvNeXt and Swin: features.0 stem, stages at odd indices, each downsampling
    layer (even indices from 2) with the first block of the stage after it."""
    part = re.match(r"features\.(\d+)\.(?:(\d+)\.)?", name)
    if part is None:
        return None  # the final norm
    index = int(part[1])
    if index == 0:
        return (0.0,)
    if index % 2:
        return (1.0, float(index), float(part[2]))
    return (1.0, float(index + 1), 0.0)


def check_layer_decay(arch: str, image_size: int = 224) -> None:
    """ValueError naming layer_decay when the trunk of `arch` has no blocks layer decay knows
    (cheap: a timm model is looked at on the meta device)."""
    if is_timm_arch(arch):
        if not _timm_backbone().has_layers(arch, image_size):
            raise ValueError(f"layer_decay: timm's {arch} does not say where its blocks are (no "
                             "group_matcher); use layer_decay = 1")
        return
    family = family_of(arch)
    if family not in LAYERED_FAMILIES:
        families = f"{', '.join(LAYERED_FAMILIES[:-1])} or {LAYERED_FAMILIES[-1]}"
        raise ValueError(f"layer_decay: {arch} is a {family}; layer decay runs over the blocks of a "
                         f"{families} trunk or a timm model; use layer_decay = 1")


def describe(groups: Iterable[dict], lr: float) -> list[tuple[int, float, float]]:
    """(tensors, weight decay, learning rate at `lr`) of each group: what a run prints and tests read."""
    return [(len(group["params"]), group["weight_decay"], lr * group.get("lr_scale", 1.0)) for group in groups]
