import ast
import importlib.util
import os
import re
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest

from support import config
from support.config import Config, ConfigError

ROOT = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "c.toml"
    path.write_text(text)
    return path


def test_demo_config_is_the_default():
    assert Config(**config.load_toml(ROOT / "configs" / "demo.toml")) == Config()


def test_reference_recipe_values():
    cfg = Config(**config.load_toml(ROOT / "configs" / "inshop_r50.toml"))
    assert (cfg.arch, cfg.resize, cfg.crop, cfg.batch_size, cfg.total_epochs) == ("resnet50", 512, 448, 32, 50)
    assert (cfg.lr, cfg.lr_batch_size, cfg.momentum, cfg.weight_decay, cfg.nesterov) == (0.02, 256, 0.9, 5e-4, True)
    assert (cfg.warmup_epochs, cfg.warmup_factor, cfg.scale, cfg.margin, cfg.sub_centers) == (5, 0.01, 64, 0.5, 1)
    assert cfg.embedding_dim == 0 and not cfg.easy_margin and cfg.recall_at[0] == 1 and cfg.map_at == (10,)


def test_every_config_file_loads():
    timm_installed = importlib.util.find_spec("timm") is not None
    for path in (ROOT / "configs").glob("*.toml"):
        values = config.load_toml(path)
        if values.get("arch", "").startswith("timm/") and not timm_installed:
            continue  # an optional extra: checked where it is installed
        Config(**values)


@pytest.mark.parametrize("name, arch, lr, batch, global_batch", [
    ("inshop_vits16_dino", "timm/vit_small_patch16_224.dino", 5e-5, 32, 256),
    ("inshop_vitb16_clip", "timm/vit_base_patch16_clip_224.openai", 1e-5, 16, 128),
])
def test_foundation_recipes(name, arch, lr, batch, global_batch):
    pytest.importorskip("timm")
    values = config.load_toml(ROOT / "configs" / f"{name}.toml")
    cfg = Config(**values)
    assert (cfg.arch, cfg.pretrained, cfg.optimizer, cfg.lr, cfg.lr_batch_size) == (arch, "timm", "adamw", lr, global_batch)
    assert (cfg.resize, cfg.crop, cfg.head_lr_mult, cfg.decay_norm_and_bias) == (256, 224, 10.0, False)
    assert (cfg.scale, cfg.margin) == (32.0, 0.25) and 0 < cfg.layer_decay < 1
    # 8 processes of batch_size, or one of 2 micro-batches of half the global batch (README's
    # one-GPU commands): the same steps and learning rates.
    assert cfg.global_batch_size == global_batch == 8 * cfg.batch_size == 8 * batch
    assert Config(**{**values, "batch_size": global_batch // 2}).global_batch_size == global_batch


def test_precedence_defaults_file_flags_positionals(tmp_path):
    path = write(tmp_path, "batch_size = 16\nlr = 0.1\ntotal_epochs = 7\nrecall_at = [1, 10]\n")
    parser = config.arg_parser()
    cfg = config.from_args(parser.parse_args(["--config", str(path), "--lr", "0.3"]))
    assert (cfg.batch_size, cfg.lr, cfg.total_epochs, cfg.recall_at) == (16, 0.3, 7, (1, 10))
    assert cfg.momentum == Config().momentum
    cfg = config.from_args(parser.parse_args(["5", "2", "--config", str(path), "--total_epochs", "9"]))
    assert (cfg.total_epochs, cfg.save_every) == (5, 2)


def test_dashes_and_underscores_and_bools():
    parser = config.arg_parser()
    cfg = config.from_args(parser.parse_args(["--batch-size", "4", "--sync_bn", "true", "--nesterov", "no"]))
    assert cfg.batch_size == 4 and cfg.sync_bn is True and cfg.nesterov is False
    cfg = config.from_args(parser.parse_args(["--total-epochs", "3", "--save-every", "2"]))
    assert (cfg.total_epochs, cfg.save_every) == (3, 2)


def test_dump_and_load_round_trip(tmp_path):
    cfg = Config(total_epochs=3, out_dir='odd "dir"\\x', recall_at=(1, 2, 3), lr=1e-3, channels_last=True)
    path = write(tmp_path, config.dump_toml(cfg))
    assert Config(**config.load_toml(path)) == cfg


@pytest.mark.parametrize("text, words", [
    ("batchsize = 3\n", ["batchsize", "batch_size", "c.toml"]),
    ("learning_rate = 0.1\n", ["learning_rate", "(did you mean 'lr'?)"]),
    ("batch_size = 'big'\n", ["batch_size", "integer"]),
    ("lr = -1\n", ["lr", "> 0"]),
    ("amp = 'fp8'\n", ["amp", "bf16"]),
    ("crop = 600\n", ["crop", "resize"]),
    ("recall_at = []\n", ["recall_at"]),
    ("arch = 'vgg'\n", ["arch", "resnet50"]),
    ("arch = 'convnext_tinny'\n", ["arch", "did you mean 'convnext_tiny'"]),
    ("arch = 'vit_b_16'\npooling = 'gem'\n", ["pooling", "class token", "avg"]),
    ("arch = 'vit_b_32'\ncrop = 48\n", ["crop", "vit_b_32", "multiple of 32", "32 or 64"]),
    ("out_dir = ''\n", ["out_dir", "folder path"]),
    ("synthetic_dir = ' '\n", ["synthetic_dir", "folder path"]),
    ("lr = [\n", ["c.toml", "TOML"]),
])
def test_bad_file_names_the_key(tmp_path, text, words):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        Config(**config.load_toml(path))
    for word in words:
        assert word in str(info.value)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="nope.toml"):
        config.load_toml(tmp_path / "nope.toml")


def test_every_field_has_a_flag():
    parser = config.arg_parser()
    options = {s for a in parser._actions for s in a.option_strings}
    for f in fields(Config):
        assert f"--{f.name}" in options


@pytest.mark.parametrize("argv, words", [
    (["--batchsize", "3"], ["--batchsize", "batch_size"]),
    (["--model", "resnet50"], ["unrecognized argument '--model'"]),
    (["--lr", "0"], ["lr", "> 0"]),
    (["--amp", "fp8"], ["amp"]),
])
def test_launcher_exits_non_zero_naming_the_key(argv, words):
    proc = subprocess.run([sys.executable, "single_gpu.py", *argv], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2
    for word in words:
        assert word in proc.stderr


@pytest.mark.parametrize("launcher, argv, words", [
    ("single_gpu.py", ["--config", "configs"], ["configs: expected a TOML file, got a folder"]),
    ("single_gpu.py", ["--config", "/dev/zero"], ["/dev/zero: expected a TOML file, got a special file"]),
    ("single_gpu.py", ["--collective_timeout_s", "1e-9"], ["collective_timeout_s: expected a value >= 1"]),
    ("multigpu.py", ["--nprocs", "0"], ["--nprocs: expected at least 1 process, got 0"]),
    ("multigpu.py", ["--nprocs", "-1"], ["--nprocs: expected at least 1 process, got -1"]),
])
def test_hostile_values_stop_in_one_line_with_status_2(launcher, argv, words):
    proc = subprocess.run([sys.executable, launcher, *argv], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    for word in words:
        assert word in proc.stderr.strip().splitlines()[-1]


def test_a_config_file_too_large_to_be_one_is_refused_unread(tmp_path):
    huge = tmp_path / "huge.toml"
    with open(huge, "wb") as f:
        f.truncate(config.MAX_CONFIG_BYTES + 1)  # sparse: nothing is written, nothing must be read
    with pytest.raises(ConfigError, match=f"^{huge}: {config.MAX_CONFIG_BYTES + 1} bytes is not a config file"):
        config.load_toml(huge)


def test_one_gpu_recipe_differs_from_the_reference_only_in_batch_and_precision():
    ref = config.load_toml(ROOT / "configs" / "inshop_r50.toml")
    one = Config(**config.load_toml(ROOT / "configs" / "inshop_r50_1gpu.toml"))
    same = {k: v for k, v in ref.items()
            if k not in ("batch_size", "eval_batch_size", "num_workers", "amp", "out_dir", "log_every")}
    assert {k: getattr(one, k) for k in same} == {k: Config(**ref).__getattribute__(k) for k in same}
    assert one.batch_size == 64 and one.amp == "auto"


@pytest.mark.parametrize("flags, words", [
    (["--recall_at", "5"], ["recall_at", "holding 1"]),
    (["--margin", "3.5"], ["margin", "[0, pi)"]),
    (["--max_image_pixels", "0"], ["max_image_pixels", "> 0"]),
    (["--data_root", "{tmp}/nowhere"], ["data_root", "nowhere", "list_eval_partition.txt"]),
    (["--margin_file", "{tmp}/margins.txt"], ["margin_file", "margins.txt"]),
    (["--pretrained", "{tmp}/r50.pth"], ["pretrained", "r50.pth"]),
    (["--out_dir", "{tmp}/a_file/run"], ["out_dir", "a_file"]),
    (["--snapshot", "{tmp}/a_file/snapshot.pt"], ["snapshot", "a_file"]),
    (["--out_dir", ""], ["out_dir: expected a folder path, got ''"]),
    (["--out_dir", "  "], ["out_dir: expected a folder path"]),
    (["--synthetic_dir", ""], ["synthetic_dir: expected a folder path"]),
    (["--snapshot", " "], ["snapshot: expected a path or"]),
    (["--data_root", "\t"], ["data_root: expected a path or"]),
    (["--arch", "efficientnet_b9"], ["arch: 'efficientnet_b9' is not a known backbone; did you mean"]),
    (["--arch", "vit_b_16", "--pooling", "gem"], ["pooling: 'gem'", "vit_b_16"]),
    (["--arch", "vit_b_16", "--crop", "60"], ["crop: vit_b_16", "multiple of 16", "48 or 64"]),
])
def test_unusable_values_and_paths_exit_2_naming_the_key(tmp_path, capsys, flags, words):
    (tmp_path / "a_file").write_text("not a folder")
    parser = config.arg_parser()
    args = parser.parse_args([flag.format(tmp=tmp_path) for flag in flags])
    with pytest.raises(SystemExit) as exit_info:
        config.config_or_exit(parser, args)
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert all(word in error for word in words), error


def test_existing_paths_pass(tmp_path):
    (tmp_path / "margins.txt").write_text("0.5\n")
    cfg = Config(data_root=str(tmp_path), margin_file=str(tmp_path / "margins.txt"), pretrained="imagenet",
                 out_dir=str(tmp_path / "new" / "run"), recall_at=(5, 1))
    config.check_paths(cfg)


@pytest.mark.parametrize("argv, flag, hint", [
    (["--model", "resnet50"], "--model", None),
    (["--resume", "x"], "--resume", None),
    (["--lr-rate", "0.1"], "--lr-rate", "--lr"),
    (["--lr_rate=0.1"], "--lr_rate", "--lr"),
    (["--learning_rate=0.1"], "--learning_rate", "--lr"),
    (["--batchsize", "8"], "--batchsize", "--batch_size"),
    (["5", "--embeding-dim", "4"], "--embeding-dim", "--embedding_dim"),
    (["--margin", "-0.5", "--epochs", "3"], "--epochs", None),
])
def test_unknown_flag_is_named_before_its_value_is_parsed(capsys, argv, flag, hint):
    with pytest.raises(SystemExit) as info:
        config.arg_parser().parse_args(argv)
    assert info.value.code == 2
    last_line = capsys.readouterr().err.strip().splitlines()[-1]
    assert last_line.endswith(f"unrecognized argument {flag!r}" + (f" (did you mean {hint!r}?)" if hint else ""))


@pytest.mark.parametrize("key, expected", [
    ("batchsize", "batch_size"),  # the same letters
    ("pool", "pooling"),  # an abbreviation
    ("lr_rate", "lr"), ("amp_mode", "amp"), ("lr_batch", "lr_batch_size"),  # a name and more words
    ("learning_rate", "lr"), ("wd", "weight_decay"),  # initials
    ("embeding_dim", "embedding_dim"), ("Num-Worker", "num_workers"),  # a letter or two off
    ("model", None), ("resume", None), ("epochs", None),  # nothing is close
    ("eval", None), ("synth", None),  # several names are as close
])
def test_closest_name_suggests_only_a_really_close_field(key, expected):
    assert config.closest_name(key, [f.name for f in fields(Config)]) == expected



@pytest.mark.parametrize("flags, message", [
    (["--total_epochs", "1000000000000"], "total_epochs: expected a value <= 100000, got 1000000000000"),
    (["1000000000000"], "total_epochs: expected a value <= 100000"),
    (["--resize", "100000", "--crop", "64"], "resize: expected a value <= 8192, got 100000"),
    (["--synthetic_size", "100000"], "synthetic_size: expected a value <= 8192"),
    (["--batch_size", "10000000"], "batch_size: expected a value <= 65536"),
    (["--num_workers", "100000"], "num_workers: expected a value <= 256"),
    (["--embedding_dim", "10000000"], "embedding_dim: expected a value <= 65536"),
    (["--sub_centers", "1000"], "sub_centers: expected a value <= 64"),
    (["--synthetic_items", "100000000"], "synthetic_items: expected a value <= 100000"),
    (["--seed", str(2**64)], "seed: expected a value <= 4294967295"),
])
def test_absurd_sizes_exit_2_naming_the_key_and_the_bound(capsys, flags, message):
    parser = config.arg_parser()
    with pytest.raises(SystemExit) as info:
        config.config_or_exit(parser, parser.parse_args(flags))
    assert info.value.code == 2
    assert message in capsys.readouterr().err.strip().splitlines()[-1]


def test_every_bound_is_inclusive_and_far_past_the_reference_recipe():
    reference = Config(**config.load_toml(ROOT / "configs" / "inshop_r50.toml"))
    # (A fraction's at_most, layer_decay <= 1, is its range, not a guard against an extra zero.)
    bounds = {f.name: f.metadata["at_most"] for f in fields(Config) if f.metadata.get("at_most", 0) > 1}
    assert len(bounds) >= 20  # every size, count, seed and timeout
    for key, bound in bounds.items():
        assert bound >= 10 * max(getattr(reference, key), 1), key
        sizes = {"resize": bound} if key == "crop" else {}
        assert getattr(Config(**{key: bound, **sizes}), key) == bound
        with pytest.raises(ConfigError, match=f"^{key}: expected a value <= {bound}"):
            Config(**{key: bound + 1, **sizes})


def test_max_image_pixels_defaults_to_pils_bomb_limit_and_round_trips(tmp_path):
    assert Config().max_image_pixels == 89_478_485  # PIL's Image.MAX_IMAGE_PIXELS
    cfg = config.from_args(config.arg_parser().parse_args(["--max-image-pixels", "200000000"]))
    assert Config(**config.load_toml(write(tmp_path, config.dump_toml(cfg)))).max_image_pixels == 200_000_000


def test_choices_and_the_margin_rule_are_the_ones_of_the_code_that_uses_them():
    from arcface import head, metrics, model
    assert "choices" not in config.facts("arch")  # too many to list: model.check_backbone checks it
    for arch, pooling, crop in [("vgg16", "avg", 64), ("vit_b_16", "gem", 64), ("vit_b_16", "avg", 60)]:
        with pytest.raises(ValueError) as model_error:
            model.check_backbone(arch, pooling, crop)
        with pytest.raises(ConfigError) as config_error:
            Config(arch=arch, pooling=pooling, crop=crop, resize=72)
        assert str(config_error.value) == str(model_error.value)
    assert all(Config(arch=arch, crop=224, resize=256).arch == arch for arch in model.ARCHS if arch != "vit_h_14")
    assert config.facts("pooling")["choices"] is model.POOLINGS
    assert config.facts("ap_mode")["choices"] is metrics.AP_MODES
    with pytest.raises(ValueError) as head_error:
        head.check_margin(3.5, "margin")
    with pytest.raises(ConfigError) as config_error:
        Config(margin=3.5)
    assert str(config_error.value) == str(head_error.value)


SECTIONS = ["run length and outputs", "data", "model", "optimisation", "hardware and speed", "evaluation"]


def test_help_has_one_entry_per_field_with_its_text_and_default_grouped_like_the_dataclass():
    text = config.arg_parser().format_help()
    flat = " ".join(text.split())  # argparse wraps long help lines
    titles = [line[:-1] for line in text.splitlines() if line.endswith(":") and not line.startswith(" ")]
    assert titles[-len(SECTIONS):] == SECTIONS
    defaults = Config()
    for f in fields(Config):
        assert len(re.findall(rf"^  --{f.name}\b", text, flags=re.M)) == 1, f.name  # no second alias shown
        assert f.metadata["help"] in flat, f.name
        assert f"(default: {config._toml_value(getattr(defaults, f.name))})" in flat, f.name
    for section, first in zip(SECTIONS, ["total_epochs", "data_root", "arch", "lr", "device", "recall_at"]):
        assert re.search(rf"^{section}:\n  --{first}\b", text, flags=re.M), section
    for flag, choices in [("amp", "auto,bf16,fp16,off"), ("device", "auto,cuda,mps,cpu"), ("pooling", "avg,gem"),
                          ("ap_mode", "IR,integrate")]:
        assert f"--{flag} {{{choices}}}" in text
    assert re.search(r"^  --arch ARCH +backbone: a torchvision ResNet, ResNeXt,", text, flags=re.M)
    assert "Swin-V2 or ViT model by its torchvision name" in flat
    assert "learning rate for a total batch of lr_batch_size images; scaled linearly" in flat


def test_choice_flags_take_the_model_and_metric_tuples():
    from arcface import metrics, model
    choices = {a.dest: a.choices for a in config.arg_parser()._actions if a.choices}
    assert "opt_arch" not in choices and choices["opt_pooling"] == model.POOLINGS
    assert choices["opt_ap_mode"] == metrics.AP_MODES


@pytest.mark.parametrize("argv, compile, sync_bn, nesterov", [
    (["--compile"], True, None, None),
    (["--compile", "--sync-bn", "--nesterov", "false"], True, True, False),
    (["--compile=no", "--sync_bn"], False, True, None),
    (["--no-compile", "--no_sync_bn", "--no-nesterov"], False, False, False),
    (["3", "--compile"], True, None, None),
])
def test_booleans_are_switches_and_still_take_a_value(argv, compile, sync_bn, nesterov):
    args = config.arg_parser().parse_args(argv)
    assert (args.opt_compile, args.opt_sync_bn, args.opt_nesterov) == (compile, sync_bn, nesterov)


def test_a_number_after_a_boolean_switch_says_where_positionals_go(capsys):
    with pytest.raises(SystemExit):
        config.arg_parser().parse_args(["--compile", "5"])
    assert "got '5' (put total_epochs and save_every before the flags)" in capsys.readouterr().err


@pytest.mark.parametrize("launcher, own_flag", [("single_gpu.py", None), ("multigpu.py", "--nprocs")])
def test_launcher_help_keeps_its_usage_lines_as_written(launcher, own_flag):
    proc = subprocess.run([sys.executable, launcher, "--help"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "COLUMNS": "80"})
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    doc = ast.get_docstring(ast.parse((ROOT / launcher).read_text()), clean=False)
    usage_lines = [line for line in doc.splitlines() if line.startswith("    ")]
    assert usage_lines and all(line in lines for line in usage_lines)
    assert all(f"{section}:" in lines for section in SECTIONS)
    if own_flag:
        assert any(line.startswith(f"  {own_flag} ") for line in lines)


def test_a_toml_file_that_is_not_utf8_names_file_and_line(tmp_path):
    path = tmp_path / "c.toml"
    path.write_bytes(b"lr = 0.1\n# r\xe9glages\nbatch_size = 8\n")  # a Latin-1 comment
    with pytest.raises(ConfigError) as caught:
        config.load_toml(path)
    assert str(caught.value) == f"{path}:2: not UTF-8 text (byte 0xE9 at column 4)"


@pytest.mark.parametrize("values, message", [
    (dict(partial_fc=1.5), "partial_fc: expected 0 .dense head. or a sampling rate in .0, 1., got 1.5"),
    (dict(partial_fc=-0.1), "partial_fc: expected a value >= 0"),
    (dict(partial_fc=0.5, amp="fp16"), "partial_fc: needs amp bf16, auto or off"),
    (dict(partial_fc=1.0, compile=True), "partial_fc: cannot be compiled"),
])
def test_partial_fc_values_that_cannot_train_are_refused(values, message):
    with pytest.raises(ConfigError, match=message):
        Config(**values)
