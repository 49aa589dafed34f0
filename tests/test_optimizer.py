"""job.make_optimizer: SGD or AdamW over parameter groups (weight decay or none, layer decay, the
head's multiple), with exactly the groups and learning rates README and arcface/param_groups.py state."""

import re

import pytest
import torch

from arcface import model as model_module
from arcface.model import build_model
from arcface.param_groups import param_groups, trunk_lr_scales
from job import make_optimizer
from support.config import Config, ConfigError
from support.schedule import make_schedule

RECIPE = dict(optimizer="adamw", lr=1e-3, lr_batch_size=32, weight_decay=0.05, decay_norm_and_bias=False,
              head_lr_mult=10.0, adam_beta1=0.8, adam_beta2=0.95, adam_eps=1e-6)


def optimizer_for(model: torch.nn.Module, **values) -> tuple[torch.optim.Optimizer, float]:
    cfg = Config(batch_size=32, **values)
    schedule = make_schedule(cfg, 320, world_size=1)
    return make_optimizer(cfg, model, schedule), schedule.base_lr


def lr_and_decay(optimizer: torch.optim.Optimizer, model: torch.nn.Module) -> dict[str, tuple[float, float]]:
    """{parameter name: (its group's lr, its group's weight decay)}."""
    group_of = {id(p): group for group in optimizer.param_groups for p in group["params"]}
    return {name: (group_of[id(p)]["lr"], group_of[id(p)]["weight_decay"]) for name, p in model.named_parameters()}


def test_the_default_is_one_group_of_every_parameter_and_steps_as_plain_sgd():
    torch.manual_seed(0)
    model = build_model(5, "resnet18", image_size=32)
    reference = build_model(5, "resnet18", image_size=32)
    reference.load_state_dict(model.state_dict())
    optimizer, base_lr = optimizer_for(model)
    (group,) = optimizer.param_groups
    assert group["params"] == list(model.parameters()) and group["lr_scale"] == 1.0
    assert isinstance(optimizer, torch.optim.SGD) and group["nesterov"] and group["weight_decay"] == 5e-4
    plain = torch.optim.SGD(reference.parameters(), lr=base_lr, momentum=0.9, weight_decay=5e-4, nesterov=True)
    images, labels = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    for net, opt in ((model, optimizer), (reference, plain)):
        for _ in range(2):
            net(images, labels).backward()
            opt.step()
            opt.zero_grad()
    for (name, a), b in zip(model.named_parameters(), reference.parameters()):
        assert torch.equal(a, b), name  # bit for bit: the reference recipe is unchanged


def test_adamw_on_a_resnet_spares_norms_and_biases_and_runs_the_head_at_its_multiple():
    model = build_model(5, "resnet18", image_size=32)
    optimizer, base_lr = optimizer_for(model, **RECIPE)
    assert isinstance(optimizer, torch.optim.AdamW)
    assert {(g["betas"], g["eps"]) for g in optimizer.param_groups} == {((0.8, 0.95), 1e-6)}
    # Three groups, in the order their first parameters come: conv1.weight, bn1.weight, head.weight.
    assert [(g["weight_decay"], g["lr"]) for g in optimizer.param_groups] == [
        (0.05, base_lr), (0.0, base_lr), (0.05, 10 * base_lr)]
    for name, (lr, decay) in lr_and_decay(optimizer, model).items():
        spared = name.endswith(".bias") or ".bn" in name or "downsample.1" in name
        assert (lr, decay) == ((10 * base_lr, 0.05) if name == "head.weight" else (base_lr, 0.0 if spared else 0.05)), name


def test_adamw_with_layer_decay_on_a_timm_vit_gives_each_block_its_lr():
    pytest.importorskip("timm")
    torch.manual_seed(0)
    model = build_model(5, "timm/vit_tiny_patch16_224", image_size=32)  # 12 blocks
    optimizer, base_lr = optimizer_for(model, arch="timm/vit_tiny_patch16_224", resize=36, crop=32,
                                       layer_decay=0.5, **RECIPE)
    d, top = 0.5, 13  # L + 1

    def expected(name: str) -> tuple[float, float]:
        if name == "head.weight":
            return 10 * base_lr, 0.05
        block = re.match(r"backbone\.blocks\.(\d+)\.", name)
        stem = re.match(r"backbone\.(cls_token|pos_embed|patch_embed\.)", name)
        scale = d ** (top - int(block[1]) - 1) if block else d ** top if stem else 1.0  # backbone.norm: 1
        spared = name.endswith((".bias", "norm1.weight", "norm2.weight", "norm.weight", "cls_token", "pos_embed"))
        return base_lr * scale, 0.0 if spared else 0.05

    got = lr_and_decay(optimizer, model)
    assert got == {name: expected(name) for name in got}
    assert got["backbone.blocks.11.mlp.fc2.weight"] == (base_lr * 0.5, 0.05)
    assert got["backbone.patch_embed.proj.weight"] == (base_lr * 0.5**13, 0.05)
    assert len(optimizer.param_groups) == 2 * 13 + 2  # (decay, spared) per layer; the norm; the head


def test_torchvision_convnext_swin_and_vit_blocks_in_forward_order(monkeypatch):
    # ConvNeXt-T 3+3+9+3 blocks, Swin-T 2+2+6+2: features.0 the stem, a downsampling layer with the
    # block after it, the final norm at the full lr.
    for arch, blocks, downsample, next_block, last_norm in (
            ("convnext_tiny", 18, "features.2.1.weight", "features.3.0.block.0.weight", "classifier.0.weight"),
            ("swin_t", 12, "features.6.reduction.weight", "features.7.0.norm1.weight", "norm.weight")):
        scales = trunk_lr_scales(build_model(3, arch, image_size=32), 0.5)
        assert scales["backbone.features.0.0.weight"] == 0.5 ** (blocks + 1)
        assert scales[f"backbone.{downsample}"] == scales[f"backbone.{next_block}"]
        assert scales[f"backbone.{last_norm}"] == 1.0
        assert sorted(set(scales.values())) == [0.5**k for k in range(blocks + 1, -1, -1)]
    from torchvision.models.vision_transformer import VisionTransformer
    monkeypatch.setitem(model_module._BUILDERS, "vit_b_16", lambda weights=None, image_size=224: VisionTransformer(
        image_size, 16, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32))
    scales = trunk_lr_scales(build_model(3, "vit_b_16", image_size=32), 0.5)
    assert [scales[f"backbone.{key}"] for key in ("class_token", "conv_proj.weight", "encoder.pos_embedding",
                                                  "encoder.layers.encoder_layer_0.ln_1.weight",
                                                  "encoder.layers.encoder_layer_1.mlp.0.weight", "encoder.ln.weight")
            ] == [0.125, 0.125, 0.125, 0.25, 0.5, 1.0]


def test_layer_decay_without_blocks_is_refused_in_one_line():
    with pytest.raises(ConfigError, match=r"^layer_decay: resnet18 is a ResNet; layer decay runs over the blocks"):
        Config(layer_decay=0.75)
    with pytest.raises(ValueError, match=r"^layer_decay: the model's trunk \(Sequential\) has no blocks"):
        param_groups(build_model(3, "resnet18", image_size=32), 5e-4, layer_decay=0.75)
    for values, message in ((dict(layer_decay=0.0), "layer_decay: expected a value > 0"),
                            (dict(layer_decay=1.5), "layer_decay: expected a value <= 1"),
                            (dict(adam_beta2=1.0), "adam_beta2: expected a value < 1"),
                            (dict(head_lr_mult=0.0), "head_lr_mult: expected a value > 0"),
                            (dict(drop_path=1.0), "drop_path: expected a value < 1"),
                            (dict(drop_path=0.1), "drop_path: only timm backbones")):
        with pytest.raises(ConfigError, match=f"^{re.escape(message)}"):
            Config(**values)


@pytest.mark.parametrize("flags, message", [
    (["--optimizer", "adam"], "argument --optimizer: invalid choice: 'adam' (choose from 'sgd', 'adamw')"),
    (["--layer_decay", "1.2"], "layer_decay: expected a value <= 1, got 1.2"),
    (["--pretrained", "timm"], 'pretrained: "timm" loads the weights of a timm arch'),
])
def test_bad_optimizer_settings_exit_2_naming_them(capsys, flags, message):
    from support import config
    parser = config.arg_parser()
    with pytest.raises(SystemExit) as info:
        config.config_or_exit(parser, parser.parse_args(flags))
    assert info.value.code == 2
    assert message in capsys.readouterr().err
