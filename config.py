"""Configuration: one typed dataclass, overridden by a TOML file, overridden by command-line flags.

    defaults (the demo: synthetic set, small model, minutes on a CPU)
      < --config FILE.toml (flat `key = value` lines, keys named like the fields)
      < --<field> VALUE flags (dashes or underscores) and the tutorial's [total_epochs] [save_every]

Every constant of the job is a field here, so a run directory's `config.toml` reproduces the run.
"""

from __future__ import annotations

import argparse
import difflib
import math
import tomllib
import typing
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Sequence

from arcface.textfile import DataError, read_text


class ConfigError(ValueError):
    """A configuration key or value that cannot be used; the message names the key."""


@dataclass(frozen=True)
class Config:
    # --- run length and outputs -------------------------------------------------------------
    total_epochs: int = 6
    save_every: int = 1  # snapshot every N epochs (and always at the end)
    eval_every: int = 3  # evaluate every N epochs (and always before training and at the end)
    out_dir: str = "runs/demo"
    snapshot: str = ""  # "" means <out_dir>/snapshot.pt
    seed: int = 0
    log_every: int = 10  # optimizer steps between progress-bar updates

    # --- data ------------------------------------------------------------------------------
    data_root: str = ""  # In-Shop root (Eval/ and Img/); "" trains on the synthetic set
    synthetic_dir: str = ".cache/synthetic"  # where the synthetic set is generated once
    synthetic_items: int = 300
    synthetic_views: int = 12
    synthetic_size: int = 64  # side of the generated JPEGs
    synthetic_seed: int = 0
    resize: int = 72  # images are resized to resize x resize, then cropped
    crop: int = 64
    batch_size: int = 32  # per process, as in the tutorial
    eval_batch_size: int = 128  # per process
    num_workers: int = 1  # loader processes per training process

    # --- model -----------------------------------------------------------------------------
    arch: str = "resnet18"
    pretrained: str = ""  # "", "imagenet" (torchvision weights) or a local checkpoint path
    pooling: str = "avg"  # "avg" or "gem"
    embedding_dim: int = 0  # 0 keeps the pooled feature as the embedding (the reference)
    scale: float = 64.0  # ArcFace s, as in the recipe
    margin: float = 0.5  # ArcFace m, radians, as in the recipe
    margin_file: str = ""  # one margin per class, one per line; overrides `margin`
    sub_centers: int = 1
    easy_margin: bool = False

    # --- optimisation ----------------------------------------------------------------------
    # 8x the recipe's 0.02: the demo learns from scratch, in six short epochs.
    lr: float = 0.16  # for a total batch of `lr_batch_size`; scaled linearly with the real one
    lr_batch_size: int = 256
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    warmup_epochs: float = 0.5
    warmup_factor: float = 0.01  # warm-up starts at warmup_factor * lr
    min_lr: float = 0.0  # cosine annealing ends here
    grad_accum_steps: int = 1
    clip_grad_norm: float = 0.0  # 0 disables clipping

    # --- hardware and speed ----------------------------------------------------------------
    device: str = "auto"  # auto (cuda > mps > cpu), cuda, mps, cpu
    amp: str = "auto"  # auto (bf16 on CUDA when supported, else off), bf16, fp16, off
    channels_last: bool = False
    compile: bool = False
    sync_bn: bool = False

    # --- evaluation ------------------------------------------------------------------------
    recall_at: tuple[int, ...] = (1, 5)
    map_at: tuple[int, ...] = (10,)
    ap_mode: str = "IR"  # "IR" or "integrate" (mmpretrain's two AP definitions)

    def __post_init__(self) -> None:
        _validate(self)

    @property
    def snapshot_path(self) -> Path:
        return Path(self.snapshot) if self.snapshot else Path(self.out_dir) / "snapshot.pt"


_CHOICES = {
    "pooling": ("avg", "gem"),
    "device": ("auto", "cuda", "mps", "cpu"),
    "amp": ("auto", "bf16", "fp16", "off"),
    "ap_mode": ("IR", "integrate"),
    "arch": ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152"),
}
_POSITIVE = {
    "total_epochs", "save_every", "eval_every", "log_every", "synthetic_items", "synthetic_views",
    "synthetic_size", "resize", "crop", "batch_size", "eval_batch_size", "sub_centers",
    "lr_batch_size", "grad_accum_steps", "lr", "scale",
}
_NON_NEGATIVE = {
    "num_workers", "embedding_dim", "margin", "momentum", "weight_decay", "warmup_epochs",
    "warmup_factor", "min_lr", "clip_grad_norm", "seed", "synthetic_seed",
}


def _validate(cfg: Config) -> None:
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{f.name}: expected a finite number, got {value}")
        if f.name in _POSITIVE and value <= 0:
            raise ConfigError(f"{f.name}: expected a value > 0, got {value!r}")
        if f.name in _NON_NEGATIVE and value < 0:
            raise ConfigError(f"{f.name}: expected a value >= 0, got {value!r}")
        if f.name in _CHOICES and value not in _CHOICES[f.name]:
            raise ConfigError(f"{f.name}: expected one of {', '.join(_CHOICES[f.name])}, got {value!r}")
    if cfg.crop > cfg.resize:
        raise ConfigError(f"crop: expected at most resize ({cfg.resize}), got {cfg.crop}")
    if cfg.synthetic_views < 3:
        raise ConfigError(f"synthetic_views: expected >= 3 (a test item needs a query and a gallery view), got {cfg.synthetic_views}")
    for key in ("recall_at", "map_at"):
        ks = getattr(cfg, key)
        if not ks or any(k < 1 for k in ks):
            raise ConfigError(f"{key}: expected a non-empty list of integers >= 1, got {list(ks)!r}")
    if 1 not in cfg.recall_at:
        raise ConfigError(f"recall_at: expected a list holding 1 (recall@1 picks the best epoch), got {list(cfg.recall_at)!r}")
    if not 0 <= cfg.margin < math.pi:
        raise ConfigError(f"margin: expected radians in [0, pi), got {cfg.margin}")
    if cfg.warmup_epochs > cfg.total_epochs:
        raise ConfigError(f"warmup_epochs: expected at most total_epochs ({cfg.total_epochs}), got {cfg.warmup_epochs}")


# ------------------------------------------------------------------------------------------
# Field types, TOML and command line


def _field_types() -> dict[str, type]:
    hints = typing.get_type_hints(Config)
    return {f.name: hints[f.name] for f in fields(Config)}


def _closest(key: str) -> str:
    match = difflib.get_close_matches(key, [f.name for f in fields(Config)], n=1, cutoff=0.5)
    return f" (did you mean {match[0]!r}?)" if match else ""


def _coerce(key: str, value: Any, where: str) -> Any:
    """Checks a TOML value against the field's type; ints are accepted where floats are expected."""
    kind = _field_types()[key]
    if kind is bool:
        ok = isinstance(value, bool)
    elif kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif kind is str:
        ok = isinstance(value, str)
    else:  # tuple[int, ...]
        if isinstance(value, int) and not isinstance(value, bool):
            value = [value]
        ok = isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
        value = tuple(value) if ok else value
    if not ok:
        raise ConfigError(f"{where}{key}: expected {_type_name(kind)}, got {value!r}")
    return value


def _type_name(kind: type) -> str:
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(
        kind, "a list of integers"
    )


def load_toml(path: str | Path) -> dict[str, Any]:
    """Reads a flat TOML file of Config fields; unknown keys and wrong types name the file and key."""
    path = Path(path)
    try:
        # Decoded here rather than by tomllib, so that a byte that is not UTF-8 is reported with
        # its line; tomllib's own message would name neither.
        raw = tomllib.loads(read_text(path))
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except DataError as e:
        raise ConfigError(str(e)) from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    known = set(_field_types())
    values = {}
    for key, value in raw.items():
        if key not in known:
            raise ConfigError(f"{path}: unknown key {key!r}{_closest(key)}")
        values[key] = _coerce(key, value, f"{path}: ")
    return values


def dump_toml(cfg: Config) -> str:
    """The resolved configuration as TOML that `load_toml` reads back to the same Config."""
    lines = []
    for f in fields(cfg):
        lines.append(f"{f.name} = {_toml_value(getattr(cfg, f.name))}")
    return "\n".join(lines) + "\n"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return "[" + ", ".join(_toml_value(v) for v in value) + "]"


class _Parser(argparse.ArgumentParser):
    """Reports an unknown flag with the closest valid one, and exits with status 2."""

    def parse_args(self, args: Sequence[str] | None = None, namespace=None):  # type: ignore[override]
        parsed, unknown = self.parse_known_args(args, namespace)
        flags = [a for a in unknown if a.startswith("-")]
        if unknown:
            bad = flags[0] if flags else unknown[0]
            key = bad.lstrip("-").split("=", 1)[0].replace("-", "_")
            self.error(f"unrecognized argument {bad!r}{_closest(key) if flags else ''}")
        return parsed


def arg_parser(description: str | None = None) -> argparse.ArgumentParser:
    """A parser with the tutorial's positionals and one flag per Config field; launchers add their own."""
    parser = _Parser(description=description, allow_abbrev=False,
                     usage="%(prog)s [total_epochs] [save_every] [--config FILE] [--FIELD VALUE ...]")
    parser.add_argument("total_epochs", nargs="?", type=int, default=None,
                        help="epochs to train (overrides the config)")
    parser.add_argument("save_every", nargs="?", type=int, default=None,
                        help="snapshot every N epochs (overrides the config)")
    parser.add_argument("--config", default=None, help="TOML file of config fields")
    defaults = Config()
    for name, kind in _field_types().items():
        flags = [f"--{name}"] + ([f"--{name.replace('_', '-')}"] if "_" in name else [])
        kw: dict[str, Any] = dict(dest=f"opt_{name}", default=None, metavar=name.upper(),
                                  help=f"default: {getattr(defaults, name)!r}")
        if kind is bool:
            kw["type"] = _parse_bool
            kw["metavar"] = "{true,false}"
        elif kind in (int, float, str):
            kw["type"] = kind
        else:
            kw["type"] = int
            kw["nargs"] = "+"
        parser.add_argument(*flags, **kw)
    return parser


def _parse_bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def from_args(args: argparse.Namespace) -> Config:
    """defaults < --config file < flags < positionals."""
    values: dict[str, Any] = {}
    if args.config:
        values.update(load_toml(args.config))
    for name in _field_types():
        flag_value = getattr(args, f"opt_{name}")
        if flag_value is not None:
            values[name] = tuple(flag_value) if isinstance(flag_value, list) else flag_value
    for name in ("total_epochs", "save_every"):
        if getattr(args, name) is not None:
            values[name] = getattr(args, name)
    return Config(**values)


def parse_config(argv: Sequence[str] | None = None, description: str | None = None) -> Config:
    """Parses a launcher's command line into a Config; a bad key or value exits with status 2."""
    parser = arg_parser(description)
    args = parser.parse_args(argv)
    return config_or_exit(parser, args)


def config_or_exit(parser: argparse.ArgumentParser, args: argparse.Namespace) -> Config:
    """The configuration of the command line; exits with status 2 naming the key when it is unusable."""
    try:
        cfg = from_args(args)
        check_paths(cfg)
        return cfg
    except ConfigError as e:
        parser.error(str(e))
        raise  # unreachable: parser.error exits


def check_paths(cfg: Config) -> None:
    """Paths the run reads must exist and the folders it writes must not be files: found now, not
    after the data set and model are built."""
    if cfg.data_root and not Path(cfg.data_root).is_dir():
        raise ConfigError(f"data_root: {cfg.data_root} is not a folder (expected the In-Shop root, "
                          f"with Eval/list_eval_partition.txt and Img/)")
    if cfg.margin_file and not Path(cfg.margin_file).is_file():
        raise ConfigError(f"margin_file: no such file {cfg.margin_file}")
    if cfg.pretrained not in ("", "imagenet") and not Path(cfg.pretrained).is_file():
        raise ConfigError(f"pretrained: expected \"imagenet\" or a checkpoint file; no such file {cfg.pretrained}")
    for key, folder in (("out_dir", Path(cfg.out_dir)), ("snapshot", cfg.snapshot_path.parent)):
        if any(parent.exists() and not parent.is_dir() for parent in (folder, *folder.parents)):
            raise ConfigError(f"{key}: {folder} cannot be a folder (a file is in the way)")
