import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest

import config
from config import Config, ConfigError

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
    for path in (ROOT / "configs").glob("*.toml"):
        Config(**config.load_toml(path))


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
    ("batch_size = 'big'\n", ["batch_size", "integer"]),
    ("lr = -1\n", ["lr", "> 0"]),
    ("amp = 'fp8'\n", ["amp", "bf16"]),
    ("crop = 600\n", ["crop", "resize"]),
    ("recall_at = []\n", ["recall_at"]),
    ("arch = 'vgg'\n", ["arch", "resnet50"]),
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
    (["--lr", "0"], ["lr", "> 0"]),
    (["--amp", "fp8"], ["amp"]),
])
def test_launcher_exits_non_zero_naming_the_key(argv, words):
    proc = subprocess.run([sys.executable, "single_gpu.py", *argv], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2
    for word in words:
        assert word in proc.stderr


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
    (["--data_root", "{tmp}/nowhere"], ["data_root", "nowhere", "list_eval_partition.txt"]),
    (["--margin_file", "{tmp}/margins.txt"], ["margin_file", "margins.txt"]),
    (["--pretrained", "{tmp}/r50.pth"], ["pretrained", "r50.pth"]),
    (["--out_dir", "{tmp}/a_file/run"], ["out_dir", "a_file"]),
    (["--snapshot", "{tmp}/a_file/snapshot.pt"], ["snapshot", "a_file"]),
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


def test_a_toml_file_that_is_not_utf8_names_file_and_line(tmp_path):
    path = tmp_path / "c.toml"
    path.write_bytes(b"lr = 0.1\n# r\xe9glages\nbatch_size = 8\n")  # a Latin-1 comment
    with pytest.raises(ConfigError) as caught:
        config.load_toml(path)
    assert str(caught.value) == f"{path}:2: not UTF-8 text (byte 0xE9 at column 4)"
