"""RetrievalModel shapes, pooling math, and loading backbone / mmpretrain checkpoints (offline)."""

import urllib.error
import warnings

import pytest
import torch
import torchvision
from torchvision.models.vision_transformer import VisionTransformer, interpolate_embeddings

from arcface import model as model_module
from arcface.model import (ARCHS, FAMILIES, GeM, build_model, build_torchvision, load_backbone_state,
                           load_mmpretrain_retriever, read_state_dict)

NUM_CLASSES = 5


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def torchvision_state() -> dict[str, torch.Tensor]:
    """A torchvision resnet18 state dict with non-default values, so a copy is recognisable."""
    torch.manual_seed(1)
    resnet = torchvision.models.resnet18(weights=None)
    with torch.no_grad():
        for bn in (m for m in resnet.modules() if isinstance(m, torch.nn.BatchNorm2d)):
            bn.running_mean.normal_()
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.uniform_(0.5, 1.5)
    return resnet.state_dict()


def assert_backbone_equals(model, state: dict[str, torch.Tensor]) -> None:
    loaded = model.backbone.state_dict()
    assert set(loaded) == {key for key in state if not key.startswith("fc.")}
    for key, tensor in loaded.items():
        assert torch.equal(tensor, state[key]), key


@pytest.mark.parametrize(
    "pooling, embedding_dim, expected_dim",
    [("avg", None, 512), ("gem", None, 512), ("avg", 32, 32), ("gem", 16, 16)],
)
def test_output_shapes(images, pooling, embedding_dim, expected_dim):
    model = build_model(NUM_CLASSES, "resnet18", pooling=pooling, embedding_dim=embedding_dim)
    labels = torch.tensor([0, 4])
    assert model.embedding_dim == expected_dim
    assert model.embed(images).shape == (2, expected_dim)
    assert model(images).shape == (2, expected_dim)
    logits = model.head(model.embed(images), labels)
    assert logits.shape == (2, NUM_CLASSES)
    loss = model(images, labels)  # the training forward: the head's loss
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(logits, labels))
    # One forward with labels reaches every trainable parameter (what DDP requires).
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_backbone_keys_and_features_equal_torchvision(images, torchvision_state):
    model = build_model(NUM_CLASSES, "resnet18")
    trunk_state = {k: v for k, v in torchvision_state.items() if not k.startswith("fc.")}
    model.backbone.load_state_dict(trunk_state)
    resnet = torchvision.models.resnet18(weights=None)
    resnet.load_state_dict(torchvision_state)
    resnet.fc = torch.nn.Identity()  # torchvision's own pooled feature
    model.eval()
    resnet.eval()
    with torch.no_grad():
        torch.testing.assert_close(model.embed(images), resnet(images))
    assert "backbone.layer1.0.conv1.weight" in model.state_dict()
    keys = model.state_dict()
    assert not any(key.startswith(("backbone.fc", "backbone.avgpool")) for key in keys)


def test_gem_matches_closed_form_and_learns_p():
    x = torch.rand(2, 3, 4, 5, generator=torch.Generator().manual_seed(0))
    gem = GeM()
    assert gem.p.shape == (1,) and gem.p.item() == 3.0
    expected = (x.double().clamp(min=1e-6) ** 3).mean(dim=(2, 3)) ** (1 / 3)
    torch.testing.assert_close(gem(x).double(), expected)
    with torch.no_grad():
        gem.p.fill_(1.0)
    torch.testing.assert_close(gem(x), x.mean(dim=(2, 3)))
    gem(x).sum().backward()
    assert gem.p.grad is not None and torch.isfinite(gem.p.grad).all()


def test_gem_is_float32_under_autocast():
    x = torch.rand(1, 2, 3, 3) * 60  # 60^3 overflows float16
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        pooled = GeM()(x.bfloat16())
    assert pooled.dtype == torch.float32 and torch.isfinite(pooled).all()


def test_build_model_rejects_bad_arguments():
    with pytest.raises(ValueError, match="arch: 'vgg16' is a torchvision model, but not of an accepted family"):
        build_model(NUM_CLASSES, "vgg16")
    with pytest.raises(ValueError, match="pooling: expected 'avg' or 'gem'"):
        build_model(NUM_CLASSES, "resnet18", pooling="max")
    with pytest.raises(ValueError, match="embedding_dim"):
        build_model(NUM_CLASSES, "resnet18", embedding_dim=0)


def test_load_wrapped_prefixed_checkpoint_reproduces_weights(tmp_path, torchvision_state):
    wrapped = {"module.backbone." + key: value for key, value in torchvision_state.items()}
    wrapped["module.head.weight"] = torch.randn(NUM_CLASSES, 512)
    wrapped["module.neck.p"] = torch.tensor([3.0])
    assert "module.backbone.fc.weight" in wrapped  # a whole classifier saved as the backbone
    path = tmp_path / "ddp_snapshot.pth"
    torch.save({"state_dict": wrapped, "epoch": 3}, path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a complete backbone loads without a report
        model = build_model(NUM_CLASSES, "resnet18", pretrained=str(path))
    assert_backbone_equals(model, torchvision_state)
    # head.* was not taken from the file: it is a backbone load
    assert not torch.equal(model.head.weight, wrapped["module.head.weight"])


def test_plain_torchvision_state_dict_drops_fc(tmp_path, torchvision_state):
    path = tmp_path / "resnet18.pth"
    torch.save(torchvision_state, path)
    model = build_model(NUM_CLASSES, "resnet18")
    report = model_module.load_pretrained_backbone(model.backbone, "resnet18", path)
    assert_backbone_equals(model, torchvision_state)
    assert report.missing_keys == [] and report.unexpected_keys == []
    assert report.ignored_keys == ["fc.bias", "fc.weight"]


def test_missing_and_unexpected_keys_are_reported(tmp_path, torchvision_state):
    state = dict(torchvision_state)
    del state["layer4.1.bn2.weight"]
    state["layer5.0.conv1.weight"] = torch.zeros(1)
    path = tmp_path / "partial.pth"
    torch.save({"model": state}, path)
    model = build_model(NUM_CLASSES, "resnet18")
    with pytest.warns(UserWarning, match=r"1 missing keys \[layer4\.1\.bn2\.weight\]"):
        report = model_module.load_pretrained_backbone(model.backbone, "resnet18", path)
    assert report.missing_keys == ["layer4.1.bn2.weight"]
    assert report.unexpected_keys == ["layer5.0.conv1.weight"]
    assert torch.equal(model.backbone.conv1.weight, state["conv1.weight"])


def test_shape_mismatch_names_key_and_both_shapes(tmp_path, torchvision_state):
    state = {"backbone." + key: value for key, value in torchvision_state.items()}
    state["backbone.layer2.0.conv1.weight"] = torch.zeros(128, 64, 1, 1)
    path = tmp_path / "wrong.pth"
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"wrong\.pth: 'backbone\.layer2\.0\.conv1\.weight' has "
                       r"shape \(128, 64, 1, 1\).*\(128, 64, 3, 3\)"):
        build_model(NUM_CLASSES, "resnet18", pretrained=str(path))


def test_files_that_are_not_checkpoints(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("not a checkpoint\n")
    with pytest.raises(ValueError, match=r"notes\.txt: not a PyTorch checkpoint"):
        read_state_dict(text)
    with pytest.raises(FileNotFoundError, match=r"absent\.pth"):
        read_state_dict(tmp_path / "absent.pth")
    mixed = tmp_path / "mixed.pth"
    torch.save({"conv1.weight": torch.zeros(1), "lr": 0.1}, mixed)
    with pytest.raises(ValueError, match=r"mixed\.pth: .*key 'lr' holds a float"):
        read_state_dict(mixed)


@pytest.mark.parametrize("arch, version", [("resnet18", "V1"), ("resnet50", "V2")])
def test_imagenet_download_failure_explains_the_local_file_route(monkeypatch, arch, version):
    requested = []

    def no_network(url, *args, **kwargs):
        requested.append(url)
        raise urllib.error.URLError("Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_network)
    with pytest.raises(RuntimeError, match=r"could not download .*pretrained=/path/to/resnet"):
        model_module.imagenet_state_dict(arch)
    weights = getattr(torchvision.models, f"ResNet{arch[6:]}_Weights")[f"IMAGENET1K_{version}"]
    assert requested == [weights.url]
    if arch == "resnet18":
        with pytest.raises(RuntimeError, match="name resolution"):
            build_model(NUM_CLASSES, arch, pretrained="imagenet")


def mmpretrain_checkpoint(torchvision_state, rows, layout="backbone"):
    """What an mmpretrain ArcFace checkpoint holds (mmengine's `meta` + `state_dict`)."""
    prefix = "backbone." if layout == "backbone" else "image_encoder.0."
    state = {prefix + k: v for k, v in torchvision_state.items() if not k.startswith("fc.")}
    generator = torch.Generator().manual_seed(2)
    state["head.norm_product.weight"] = torch.randn(rows, 512, generator=generator)
    state["data_preprocessor.mean"] = torch.tensor([123.675, 116.28, 103.53]).view(3, 1, 1)
    return {"meta": {"epoch": 50, "mmpretrain_version": "1.0.0"}, "state_dict": state}


@pytest.mark.parametrize("layout", ["backbone", "image_encoder"])
def test_mmpretrain_checkpoint_loads_backbone_and_head(tmp_path, torchvision_state, layout):
    sub_centers = 2
    checkpoint = mmpretrain_checkpoint(torchvision_state, NUM_CLASSES * sub_centers, layout)
    path = tmp_path / "arcface_inshop.pth"
    torch.save(checkpoint, path)
    model = build_model(NUM_CLASSES, "resnet18", sub_centers=sub_centers)
    load_mmpretrain_retriever(model, path)
    assert_backbone_equals(model, torchvision_state)
    assert torch.equal(model.head.weight, checkpoint["state_dict"]["head.norm_product.weight"])


def test_mmpretrain_checkpoint_errors(tmp_path, torchvision_state):
    path = tmp_path / "arcface_inshop.pth"
    torch.save(mmpretrain_checkpoint(torchvision_state, rows=NUM_CLASSES), path)
    with pytest.raises(ValueError, match=r"arcface_inshop\.pth: 'head\.weight' has shape "
                       r"\(5, 512\) in the file but \(15, 512\)"):
        load_mmpretrain_retriever(build_model(NUM_CLASSES, "resnet18", sub_centers=3), path)
    with pytest.raises(ValueError, match=r"missing \[embedding\.0\.weight.*embedding_dim=None"):
        load_mmpretrain_retriever(build_model(NUM_CLASSES, "resnet18", embedding_dim=8), path)
    checkpoint = mmpretrain_checkpoint(torchvision_state, rows=NUM_CLASSES)
    del checkpoint["state_dict"]["backbone.layer3.0.bn1.running_var"]
    torch.save(checkpoint, path)
    with pytest.raises(ValueError, match=r"missing \[backbone\.layer3\.0\.bn1\.running_var\]"):
        load_mmpretrain_retriever(build_model(NUM_CLASSES, "resnet18"), path)


# ------------------------------------------------------------------------------------------
# Backbone families beyond ResNet

# The smallest member of each family (RegNet: both block types), trained at 32 px.
SMALLEST = ["resnext50_32x4d", "convnext_tiny", "efficientnet_b0", "efficientnet_v2_s", "regnet_x_400mf",
            "regnet_y_400mf", "mobilenet_v3_small", "swin_t", "swin_v2_t", "vit_b_32"]


def test_every_family_is_listed_and_has_default_imagenet_weights():
    assert {model_module._FAMILY_OF[arch] for arch in SMALLEST} | {"ResNet", "Wide ResNet"} == set(FAMILIES)
    assert len(ARCHS) == len(set(ARCHS)) == 53
    for arch in ARCHS:
        weights = model_module.imagenet_weights(arch)
        assert weights is torchvision.models.get_model_weights(arch).DEFAULT
        assert weights.url.endswith(".pth"), arch


@pytest.mark.parametrize("arch", SMALLEST)
def test_family_loads_torchvision_weights_embeds_their_feature_and_trains(arch):
    """Keys are torchvision's, its classifier is what a load leaves out, the embedding is the map
    torchvision pools (ConvNeXt: after its classifier's LayerNorm, applied per position; ViT: the
    class token), and one training step reaches every parameter."""
    torch.manual_seed(0)
    model = build_model(NUM_CLASSES, arch, embedding_dim=8, image_size=32)
    reference = build_torchvision(arch, image_size=32).eval()  # other random weights
    report = load_backbone_state(model.backbone, reference.state_dict(), "torchvision")
    trunk_keys, torchvision_keys = set(model.backbone.state_dict()), set(reference.state_dict())
    assert report.missing_keys == [] and report.unexpected_keys == [] and report.resized_keys == []
    assert trunk_keys < torchvision_keys and set(report.ignored_keys) == torchvision_keys - trunk_keys
    assert all(key.startswith(model_module._CLASSIFIER_PREFIXES) for key in report.ignored_keys)

    seen = {}
    if isinstance(reference, VisionTransformer):
        reference.heads.register_forward_hook(lambda module, args, out: seen.update(feature=args[0]))
    else:
        def pooled(module, args, out):
            feature_map = args[0]  # (N, C, h, w): what torchvision pools
            if isinstance(reference, torchvision.models.ConvNeXt):
                feature_map = reference.classifier[0](feature_map)
            seen.update(feature=feature_map.mean(dim=(2, 3)))
        reference.avgpool.register_forward_hook(pooled)
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    model.eval()
    with torch.no_grad():
        reference(images)
        torch.testing.assert_close(model.backbone(images) if arch.startswith("vit") else
                                   model.neck(model.backbone(images)), seen["feature"])
        assert model.embed(images).shape == (2, 8)

    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    labels = torch.tensor([0, 4])
    before = model.head.weight.detach().clone()
    model(images, labels).backward()
    assert [name for name, p in model.named_parameters() if p.grad is None] == []  # what DDP requires
    optimizer.step()
    assert not torch.equal(model.head.weight, before)


@pytest.mark.slow
def test_every_arch_builds_with_torchvision_keys_and_embeds(monkeypatch):
    """All 53 names, on the meta device (shapes without memory or compute)."""
    from torchvision.models.regnet import BlockParams

    # RegNet computes its block widths with tensors, which the meta device cannot turn into numbers.
    widths = BlockParams.from_init_params.__func__
    monkeypatch.setattr(BlockParams, "from_init_params",
                        classmethod(lambda cls, *args, **kwargs: _on_cpu(widths, cls, *args, **kwargs)))
    for arch in ARCHS:
        size = 224 if arch != "vit_h_14" else 518
        with torch.device("meta"):
            model = build_model(NUM_CLASSES, arch, embedding_dim=8, image_size=size)
            reference = build_torchvision(arch, image_size=size)
            embeddings = model.embed(torch.empty(2, 3, size, size))
        assert embeddings.shape == (2, 8), arch
        trunk_keys, torchvision_keys = set(model.backbone.state_dict()), set(reference.state_dict())
        assert trunk_keys < torchvision_keys, arch
        assert all(k.startswith(model_module._CLASSIFIER_PREFIXES) for k in torchvision_keys - trunk_keys), arch


def _on_cpu(function, *args, **kwargs):
    with torch.device("cpu"):
        return function(*args, **kwargs)


@pytest.mark.parametrize("arch", ["convnext_tiny", "swin_t", "efficientnet_b0", "mobilenet_v3_small"])
def test_gem_pools_every_convolutional_family(arch):
    model = build_model(NUM_CLASSES, arch, pooling="gem", image_size=32).eval()
    assert isinstance(model.neck, GeM)
    with torch.no_grad():
        assert torch.isfinite(model.embed(torch.randn(2, 3, 32, 32))).all()


def tiny_vit(weights=None, image_size=224, patch_size=16):
    """torchvision's VisionTransformer class at a fraction of vit_b_16's width and depth."""
    assert weights is None
    return VisionTransformer(image_size, patch_size, num_layers=1, num_heads=2, hidden_dim=16, mlp_dim=32)


def test_vit_position_embeddings_are_interpolated_to_the_crop(monkeypatch, tmp_path):
    monkeypatch.setitem(model_module._BUILDERS, "vit_b_16", tiny_vit)
    torchvision_state = tiny_vit(image_size=224).state_dict()  # what torchvision publishes: 224 px
    torch.save(torchvision_state, tmp_path / "vit.pth")
    model = build_model(NUM_CLASSES, "vit_b_16", image_size=48)  # 3 x 3 patches
    report = model_module.load_pretrained_backbone(model.backbone, "vit_b_16", tmp_path / "vit.pth")
    assert report.resized_keys == ["encoder.pos_embedding"] and report.ignored_keys == ["heads.head.bias",
                                                                                         "heads.head.weight"]
    expected = interpolate_embeddings(48, 16, {"encoder.pos_embedding": torchvision_state["encoder.pos_embedding"]})
    assert model.backbone.encoder.pos_embedding.shape == (1, 1 + 3 * 3, 16)
    assert torch.equal(model.backbone.encoder.pos_embedding, expected["encoder.pos_embedding"])
    assert torch.equal(model.backbone.encoder.pos_embedding[:, 0], torchvision_state["encoder.pos_embedding"][:, 0])
    assert model.embed(torch.randn(2, 3, 48, 48)).shape == (2, 16)


@pytest.mark.parametrize("arch, pooling, crop, message", [
    ("convnext_tinny", "avg", 32, r"arch: 'convnext_tinny' is not a known backbone; did you mean 'convnext_tiny'"),
    ("ResNet50", "avg", 32, r"did you mean 'resnet50'\?"),
    ("efficientnet", "avg", 32, r"did you mean 'efficientnet_b\d', 'efficientnet_b\d' or 'efficientnet_b\d'\?"),
    ("alexnet", "avg", 32, r"'alexnet' is a torchvision model, but not of an accepted family; e\.g\. 'resnet50'"),
    ("vit_b_16", "gem", 32, r"pooling: 'gem' pools a feature map, but vit_b_16 is a ViT, which embeds with its "
                            r"class token .*use pooling = \"avg\""),
    ("vit_b_16", "avg", 40, r"crop: vit_b_16 cuts images into 16 x 16 patches, so the crop must be a multiple "
                            r"of 16; got 40 \(e\.g\. crop = 32 or 48\)"),
    ("vit_h_14", "avg", 32, r"crop: .* multiple of 14; got 32 \(e\.g\. crop = 28 or 42\)"),
    ("convnext_tiny", "avg", 28, r"crop: convnext_tiny needs images of at least 32 x 32 pixels, got 28"),
])
def test_unusable_backbone_settings_are_one_line_errors_naming_the_key(arch, pooling, crop, message):
    with pytest.raises(ValueError, match=message) as error:
        build_model(NUM_CLASSES, arch, pooling=pooling, image_size=crop)  # refused before anything is built
    assert "\n" not in str(error.value)
    if not arch[0].isupper() and arch in ARCHS:
        assert "accepted" not in str(error.value)
    else:
        assert "python -c 'import arcface.model as m; print(*m.ARCHS)' lists them" in str(error.value)


@pytest.mark.parametrize("arch", ["convnext_tiny", "vit_b_16", "efficientnet_v2_s"])
def test_imagenet_weights_of_other_families_are_torchvisions_default(monkeypatch, arch):
    requested = []

    def no_network(url, *args, **kwargs):
        requested.append(url)
        raise urllib.error.URLError("Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_network)
    default = torchvision.models.get_model_weights(arch).DEFAULT
    file_name = default.url.rsplit("/", 1)[1]
    with pytest.raises(RuntimeError, match=rf"could not download torchvision's {arch} ImageNet weights "
                       rf"\({default}\).*pretrained=/path/to/{file_name}"):
        model_module.imagenet_state_dict(arch)
    assert requested == [default.url]
