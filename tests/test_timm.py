"""timm backbones ("timm/NAME[.TAG]"): embeddings, pooling, preprocessing and weights (offline, tiny
models, random init)."""

import functools
import sys
import warnings

import pytest
import torch

timm = pytest.importorskip("timm")

from arcface import model as model_module  # noqa: E402 (after the skip: these tests need timm)
from arcface import timm_backbone  # noqa: E402
from arcface.model import (WeightsUnavailable, build_model, check_backbone, load_pretrained_backbone,  # noqa: E402
                           preprocessing_for)
from arcface.transforms import IMAGENET, MEAN_RGB, STD_RGB, Preprocessing, test_transform  # noqa: E402

NUM_CLASSES = 5
VIT = "timm/vit_tiny_patch16_224"
# A supervised ViT, a CLIP ViT (TinyCLIP: the smallest timm ViT with CLIP's statistics), DINOv2's
# smallest ViT (patch 14), a ConvNeXt and an EfficientNet, at the smallest crops they take.
MODELS = {
    VIT: 32,
    "timm/vit_xsmall_patch16_clip_224.tinyclip_yfcc15m": 32,
    "timm/vit_small_patch14_dinov2.lvd142m": 56,
    "timm/convnext_atto": 32,
    "timm/efficientnet_b0": 32,
}
CONV_NETS = ["timm/convnext_atto", "timm/efficientnet_b0"]


def images(crop: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(2, 3, crop, crop, generator=torch.Generator().manual_seed(seed))


@functools.cache
def reference(arch: str, crop: int) -> torch.nn.Module:
    """timm's own model of `arch` for `crop`, headless, built without this project's code."""
    name = arch.removeprefix("timm/")
    takes_size = "vit" in name
    return timm.create_model(name, num_classes=0, **({"img_size": crop} if takes_size else {})).eval()


def timm_feature(net: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """timm's pooled pre-logits feature."""
    return net.forward_head(net.forward_features(x), pre_logits=True)


def assert_same_direction(a: torch.Tensor, b: torch.Tensor) -> None:
    cosine = torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=1)
    assert cosine.min().item() >= 0.9999, cosine


@pytest.mark.parametrize("arch", MODELS)
def test_embedding_is_timms_pooled_feature_and_training_reaches_every_parameter(arch):
    crop = MODELS[arch]
    torch.manual_seed(0)
    model = build_model(NUM_CLASSES, arch, image_size=crop).eval()
    net = reference(arch, crop)
    net.load_state_dict(model.backbone.state_dict())  # strict: the trunk's keys are timm's
    x = images(crop)
    with torch.no_grad():
        expected = timm_feature(net, x)
        embedding = model.embed(x)
    assert embedding.shape == expected.shape == (2, model.embedding_dim)
    assert_same_direction(embedding, expected)
    torch.testing.assert_close(embedding, expected)

    model.train()
    labels = torch.tensor([0, 4])
    model(x, labels).backward()  # the training forward: the head's loss
    assert [name for name, p in model.named_parameters() if p.grad is None] == []  # what DDP requires


@pytest.mark.parametrize("arch", CONV_NETS)
def test_gem_replaces_the_global_average_pool_and_embedding_dim_projects(arch):
    crop = MODELS[arch]
    model = build_model(NUM_CLASSES, arch, pooling="gem", image_size=crop, embedding_dim=8).eval()
    gem_keys = [key for key in model.state_dict() if key.endswith(".p")]
    assert len(gem_keys) == 1 and gem_keys[0].startswith("backbone.")  # in place of timm's pool
    net = reference(arch, crop)
    report = model_module.load_backbone_state(model.backbone, net.state_dict(), "timm")
    assert report.missing_keys == [] and report.unexpected_keys == []  # p is not a file's key
    x = images(crop)
    with torch.no_grad():
        assert model.embed(x).shape == (2, 8)
        assert not torch.allclose(model.backbone(x), timm_feature(net, x))  # p = 3
        model.get_parameter(gem_keys[0]).fill_(1.0)
        # Clamped at eps, GeM with p = 1 is the average of the map's positive part.
        positive = model.backbone(x)
    clamped = timm.create_model(arch.removeprefix("timm/"), num_classes=0).eval()
    clamped.load_state_dict(net.state_dict())
    pool_path = timm_backbone._gem_pool_path(clamped)
    pool = clamped.get_submodule(pool_path)
    pool.register_forward_pre_hook(lambda module, args: (args[0].clamp(min=1e-6),))
    with torch.no_grad():
        torch.testing.assert_close(positive, timm_feature(clamped, x), rtol=1e-4, atol=1e-5)


def test_drop_path_reaches_timm_and_is_refused_where_it_means_nothing():
    model = build_model(NUM_CLASSES, VIT, image_size=32, drop_path=0.1)
    assert model.backbone.blocks[-1].drop_path1.drop_prob == pytest.approx(0.1)  # timm's linear rule
    assert build_model(NUM_CLASSES, VIT, image_size=32).backbone.blocks[-1].drop_path1.__class__.__name__ == "Identity"
    with pytest.raises(ValueError, match=r"drop_path: only timm backbones .* resnet18"):
        check_backbone("resnet18", drop_path=0.1)
    check_backbone("resnet18", drop_path=0.0)  # 0: not asked for
    with pytest.raises(ValueError, match=r"drop_path: timm/vgg11 has no stochastic depth"):
        check_backbone("timm/vgg11", image_size=32, drop_path=0.1)
    with pytest.raises(ValueError, match=r"drop_path: expected a number in \[0, 1\)"):
        check_backbone(VIT, image_size=32, drop_path=1.5)


@pytest.mark.parametrize("arch, pooling, crop, message", [
    ("timm/vit_tiny_patch16_22", "avg", 32, r"arch: 'timm/vit_tiny_patch16_22' is not a timm model; did you mean "
                                            r"'timm/vit_tiny_patch16_224'"),
    ("timm/vit_small_patch16_224.dinno", "avg", 32, r"no pretrained tag 'dinno'; did you mean "
                                                    r"'timm/vit_small_patch16_224\.dino'\?"),
    ("timm/", "avg", 32, r"arch: 'timm/' names no timm model"),
    (VIT, "gem", 32, r"pooling: 'gem' replaces a global average pool over a feature map, but "
                     r"timm/vit_tiny_patch16_224 pools one token .*global_pool='token'.*use pooling = \"avg\""),
    (VIT, "avg", 40, r"crop: timm/vit_tiny_patch16_224 cuts images into 16 x 16 patches, so the crop must be a "
                     r"multiple of 16; got 40 \(e\.g\. crop = 32 or 48\)"),
    ("timm/vit_small_patch14_dinov2", "avg", 64, r"multiple of 14; got 64 \(e\.g\. crop = 56 or 70\)"),
    ("timm/convnext_atto", "avg", 16, r"crop: timm cannot build timm/convnext_atto for 16 x 16 images \(RuntimeError"),
    ("vgg11", "avg", 32, r"'vgg11' is a torchvision model, but not of an accepted family.*timm has it: "
                         r"arch = \"timm/vgg11\""),
])
def test_unusable_timm_settings_are_one_line_errors_naming_the_key(arch, pooling, crop, message):
    with pytest.raises(ValueError, match=message) as error:
        check_backbone(arch, pooling, crop)
    assert "\n" not in str(error.value)


def test_without_timm_the_error_is_the_pip_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # `import timm` raises ImportError
    for refused in (lambda: check_backbone(VIT, image_size=32), lambda: build_model(NUM_CLASSES, VIT, image_size=32),
                    lambda: preprocessing_for(VIT)):
        with pytest.raises(ImportError, match=r"^arch: 'timm/vit_tiny_patch16_224' needs timm, an optional extra "
                                              r"that is not installed: pip install timm$") as error:
            refused()
        assert isinstance(error.value, ValueError)  # config.py reports ValueErrors in one line
    assert preprocessing_for("resnet50") == IMAGENET  # torchvision archs do not need it


def test_preprocessing_follows_the_weights():
    clip = preprocessing_for("timm/vit_base_patch16_clip_224.openai")
    assert clip == Preprocessing((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711), "bicubic")
    assert preprocessing_for("timm/vit_xsmall_patch16_clip_224").mean == clip.mean  # TinyCLIP: CLIP's statistics
    assert preprocessing_for("timm/vit_base_patch16_siglip_224") == Preprocessing((0.5,) * 3, (0.5,) * 3, "bicubic")
    dinov2 = preprocessing_for("timm/vit_small_patch14_dinov2.lvd142m")
    assert dinov2 == Preprocessing((0.485, 0.456, 0.406), (0.229, 0.224, 0.225), "bicubic")
    assert preprocessing_for("convnext_tiny") == IMAGENET and IMAGENET.interpolation == "bilinear"
    assert IMAGENET.mean_255 == MEAN_RGB and IMAGENET.std_255 == STD_RGB  # today's pipeline, exactly
    assert Preprocessing.from_dict(clip.as_dict()) == clip
    assert clip.as_dict() == {"mean": list(clip.mean), "std": list(clip.std), "interpolation": "bicubic"}

    rgb = (200, 17, 90)
    image = torch.tensor(rgb, dtype=torch.uint8).view(3, 1, 1).expand(3, 40, 30).contiguous()
    out = test_transform(36, 32, **clip.transform_kwargs())(image)
    for channel in range(3):
        expected = (rgb[channel] / 255 - clip.mean[channel]) / clip.std[channel]
        assert torch.allclose(out[channel].double(), torch.full((32, 32), expected, dtype=torch.float64), atol=1e-5)
    with pytest.raises(ValueError, match=r"preprocessing mean: expected values on the 0-1 scale, got \[123\.675"):
        Preprocessing(MEAN_RGB, (0.2, 0.2, 0.2))


# ------------------------------------------------------------------------------------------------
# Weights


@pytest.fixture(scope="module")
def vit_state() -> dict[str, torch.Tensor]:
    """timm's vit_tiny at its own 224 px, with its ImageNet classifier."""
    torch.manual_seed(1)
    return timm.create_model(VIT.removeprefix("timm/")).state_dict()


def test_safetensors_file_of_a_timm_model_loads_every_key(tmp_path):
    from safetensors.torch import save_file

    source = reference(VIT, 32)
    save_file(source.state_dict(), tmp_path / "model.safetensors")
    model = build_model(NUM_CLASSES, VIT, image_size=32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a complete backbone loads without a report
        report = load_pretrained_backbone(model.backbone, VIT, tmp_path / "model.safetensors")
    assert report == model_module.BackboneLoadReport()  # nothing missing, unexpected, ignored or resized
    for key, tensor in source.state_dict().items():
        assert torch.equal(model.backbone.state_dict()[key], tensor), key


def test_file_at_another_size_is_resampled_as_timm_resamples(tmp_path, vit_state):
    torch.save({"state_dict": vit_state}, tmp_path / "vit.pth")  # a timm training checkpoint's wrapper
    model = build_model(NUM_CLASSES, VIT, image_size=32)
    report = load_pretrained_backbone(model.backbone, VIT, tmp_path / "vit.pth")
    assert report.resized_keys == ["pos_embed"] and report.ignored_keys == ["head.bias", "head.weight"]
    assert report.missing_keys == [] and report.unexpected_keys == []
    timms_own = timm.create_model(VIT.removeprefix("timm/"), num_classes=0, img_size=32,
                                  pretrained=True, pretrained_cfg_overlay={"file": str(tmp_path / "vit.pth")})
    for key, tensor in timms_own.state_dict().items():
        torch.testing.assert_close(model.backbone.state_dict()[key], tensor, msg=key)


def test_pretrained_timm_loads_the_tags_weights(monkeypatch, tmp_path, vit_state):
    """pretrained = "timm" goes through timm's own pretrained loading (here from a local file)."""
    torch.save(vit_state, tmp_path / "weights.pth")
    create = timm.create_model

    def from_local_file(name, **kwargs):
        assert name == "vit_tiny_patch16_224.augreg_in21k"  # the tag of the arch
        if kwargs.get("pretrained"):
            kwargs["pretrained_cfg_overlay"] = {"file": str(tmp_path / "weights.pth")}
        return create(name, **kwargs)

    monkeypatch.setattr(timm, "create_model", from_local_file)
    arch = VIT + ".augreg_in21k"
    model = build_model(NUM_CLASSES, arch, image_size=32, pretrained="timm")
    expected = create("vit_tiny_patch16_224", num_classes=0, img_size=32, pretrained=True,
                      pretrained_cfg_overlay={"file": str(tmp_path / "weights.pth")})
    for key, tensor in expected.state_dict().items():
        torch.testing.assert_close(model.backbone.state_dict()[key], tensor, msg=key)


def test_pretrained_timm_offline_is_one_line_naming_the_model_and_the_setting(monkeypatch, tmp_path):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))  # an empty cache
    model = build_model(NUM_CLASSES, VIT + ".augreg_in21k", image_size=32)
    with pytest.raises(WeightsUnavailable, match=r"could not fetch timm's weights for vit_tiny_patch16_224\."
                       r"augreg_in21k \(from timm/vit_tiny_patch16_224\.augreg_in21k\): .*HF_HUB_OFFLINE is set.*"
                       r"pretrained=/path/to/model\.safetensors") as error:
        load_pretrained_backbone(model.backbone, VIT + ".augreg_in21k", "timm")
    assert isinstance(error.value, OSError) and "\n" not in str(error.value)
    assert error.value.__cause__ is None and error.value.__suppress_context__  # no chained traceback
    with pytest.raises(ValueError, match=r"pretrained: 'imagenet' means torchvision's weights; .*\"timm\""):
        load_pretrained_backbone(model.backbone, VIT, "imagenet")


def test_checkpoint_of_another_model_names_the_first_mismatched_key(tmp_path):
    small = timm.create_model("vit_small_patch16_224", num_classes=0, img_size=32)
    torch.save({"model": small.state_dict()}, tmp_path / "vit_small.pth")
    model = build_model(NUM_CLASSES, VIT, image_size=32)
    with pytest.raises(ValueError, match=r"^\S*vit_small\.pth: 'cls_token' has shape \(1, 1, 384\), but the "
                       r"backbone's 'cls_token' has shape \(1, 1, 192\) \(a different architecture\?\)$"):
        load_pretrained_backbone(model.backbone, VIT, tmp_path / "vit_small.pth")
    convnext = reference("timm/convnext_atto", 32)
    torch.save(convnext.state_dict(), tmp_path / "convnext.pth")
    with pytest.raises(ValueError, match=r"convnext\.pth: no key fits the backbone \(the file's first "
                       r"'stem\.0\.weight', the backbone's first 'cls_token'\)"):
        load_pretrained_backbone(model.backbone, VIT, tmp_path / "convnext.pth")


def test_dino_layouts_take_the_teacher_backbone(tmp_path, vit_state):
    student = {f"student.module.backbone.{k}": torch.zeros_like(v) for k, v in vit_state.items()}
    teacher = {f"teacher.backbone.{k}": v for k, v in vit_state.items()}
    teacher["teacher.dino_head.mlp.0.weight"] = torch.zeros(4, 192)
    torch.save({"model": {**student, **teacher}}, tmp_path / "dinov2_train.pth")  # DINOv2's training layout
    model = build_model(NUM_CLASSES, VIT, image_size=32)
    report = load_pretrained_backbone(model.backbone, VIT, tmp_path / "dinov2_train.pth")
    assert report.missing_keys == [] and report.unexpected_keys == [] and report.resized_keys == ["pos_embed"]
    assert set(report.ignored_keys) == {*student, "teacher.dino_head.mlp.0.weight", "teacher.backbone.head.weight",
                                        "teacher.backbone.head.bias"}
    assert torch.equal(model.backbone.cls_token, vit_state["cls_token"])

    dino = {"teacher": {f"backbone.{k}": v for k, v in vit_state.items()}}  # DINO's dict wrapper, re-saved
    torch.save(dino, tmp_path / "dino.pth")
    other = build_model(NUM_CLASSES, VIT, image_size=32)
    load_pretrained_backbone(other.backbone, VIT, tmp_path / "dino.pth")
    for key, tensor in other.backbone.state_dict().items():
        assert torch.equal(tensor, model.backbone.state_dict()[key]), key

    torch.save(student, tmp_path / "student.pth")  # a student alone (DDP-wrapped in DINO) is unambiguous
    load_pretrained_backbone(other.backbone, VIT, tmp_path / "student.pth")
    assert torch.count_nonzero(other.backbone.cls_token) == 0


def openai_clip_layout(vit: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A timm CLIP ViT's weights under OpenAI's / open_clip's own names, with a text tower."""
    names = [("patch_embed.proj", "conv1"), ("norm_pre", "ln_pre"), ("blocks.", "transformer.resblocks."),
             ("attn.qkv.", "attn.in_proj_"), ("attn.proj", "attn.out_proj"), ("norm1", "ln_1"),
             ("norm2", "ln_2"), ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")]
    state = {}
    for key, tensor in vit.state_dict().items():
        if key == "cls_token":
            state["visual.class_embedding"] = tensor[0, 0]
        elif key == "pos_embed":
            state["visual.positional_embedding"] = tensor[0]
        elif key.startswith("norm."):
            state["visual.ln_post." + key.removeprefix("norm.")] = tensor
        else:
            for timm_name, openai_name in names:
                key = key.replace(timm_name, openai_name)
            state["visual." + key] = tensor
    state["visual.proj"] = torch.randn(vit.num_features, 32)
    state["transformer.resblocks.0.attn.in_proj_weight"] = torch.randn(48, 16)  # the text tower
    state["token_embedding.weight"] = torch.randn(10, 16)
    state["logit_scale"] = torch.tensor(4.6)
    return state


def test_open_clip_vit_naming_maps_through_timms_conversion(tmp_path):
    from safetensors.torch import save_file

    arch = "timm/vit_xsmall_patch16_clip_224.tinyclip_yfcc15m"
    source = reference(arch, 32)
    save_file(openai_clip_layout(source), tmp_path / "open_clip_model.safetensors")
    model = build_model(NUM_CLASSES, arch, image_size=32).eval()
    report = load_pretrained_backbone(model.backbone, arch, tmp_path / "open_clip_model.safetensors")
    assert report.missing_keys == [] and report.unexpected_keys == []
    assert report.ignored_keys == ["head.bias", "head.weight"]  # CLIP's projection: not the pooled feature
    x = images(32)
    with torch.no_grad():
        torch.testing.assert_close(model.embed(x), timm_feature(source, x))


def test_snapshot_position_embedding_fits_another_crop():
    """What tools/common.py does when --crop differs from the training crop."""
    trained = build_model(NUM_CLASSES, VIT, image_size=48)
    model = build_model(NUM_CLASSES, VIT, image_size=32)
    state = {key: model_module.fit_position_embedding(model.backbone, key.removeprefix("backbone."), tensor, "snap")
             if key.startswith("backbone.") else tensor for key, tensor in trained.state_dict().items()}
    model.load_state_dict(state, strict=True)
    assert model.backbone.pos_embed.shape == (1, 1 + 2 * 2, 192)
    torch.testing.assert_close(model.backbone.pos_embed[:, 0], trained.backbone.pos_embed[:, 0])


def test_safetensors_missing_is_the_pip_line(monkeypatch, tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"\0" * 16)
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)
    with pytest.raises(ImportError, match=r"model\.safetensors: reading \.safetensors files needs safetensors, an "
                                          r"optional extra that is not installed: pip install safetensors$"):
        model_module.read_state_dict(tmp_path / "model.safetensors")
