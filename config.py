"""Configuration: one typed dataclass, overridden by a TOML file, overridden by command-line flags.

    defaults (the demo: synthetic set, small model, minutes on a CPU)
      < --config FILE.toml (flat `key = value` lines, keys named like the fields)
      < --<field> VALUE flags (dashes or underscores; a boolean flag alone means true)
      < the tutorial's positionals [total_epochs] [save_every]

Every constant of the job is a field here, so a run directory's `config.toml` reproduces the run.
"""

from __future__ import annotations

import argparse
import difflib
import importlib.util
import math
import sys
import tomllib
import typing
from dataclasses import Field, dataclass, field, fields
from pathlib import Path
from typing import Any, Iterable, Sequence

from arcface.head import check_margin
from arcface.metrics import AP_MODES
from arcface.model import FAMILY_LIST, POOLINGS, check_backbone
from arcface.transforms import MAX_IMAGE_PIXELS, check_sizes
from runtime import UserError

from arcface.textfile import DataError, read_text


class ConfigError(UserError, ValueError):
    """A configuration key or value that cannot be used; the message names the key."""

    exit_status = 2  # argparse's status for a bad command line


def _setting(default: Any, help: str, section: str | None = None, metavar: str | None = None) -> Any:
    """A Config field with its `--help` text; `section` starts a new group of the help there;
    `metavar` names the value in the help (default: INT, FLOAT, STR)."""
    metadata = {"help": help}
    if section is not None:
        metadata["section"] = section
    if metavar is not None:
        metadata["metavar"] = metavar
    return field(default=default, metadata=metadata)


@dataclass(frozen=True)
class Config:
    """Every setting of a job.

    Each field carries its `--help` text, so the help cannot drift from the source; the field
    that names a `section` opens that group of the help (and of this class).
    """

    total_epochs: int = _setting(6, "epochs to train", section="run length and outputs")
    save_every: int = _setting(1, "snapshot every N epochs (and always at the end)")
    eval_every: int = _setting(3, "evaluate every N epochs (and always before training and at the end)")
    out_dir: str = _setting("runs/demo", "folder of the run: config.toml, metrics.jsonl, the snapshot")
    snapshot: str = _setting("", 'snapshot file; "" means <out_dir>/snapshot.pt')
    seed: int = _setting(0, "seed of the initial weights, the shuffling and the augmentation")
    log_every: int = _setting(10, "optimizer steps between progress-bar updates")
    tensorboard: bool = _setting(False, "also write metrics.jsonl's scalars as TensorBoard events in "
                                 "<out_dir>/tensorboard (needs: pip install tensorboard)")

    data_root: str = _setting("", 'In-Shop root (Eval/ and Img/); "" trains on the synthetic set',
                              section="data")
    synthetic_dir: str = _setting(".cache/synthetic", "where the synthetic set is generated once")
    synthetic_items: int = _setting(300, "items (identities) of the synthetic set")
    synthetic_views: int = _setting(12, "images of each synthetic item (at least 3)")
    synthetic_size: int = _setting(64, "side of the generated JPEGs")
    synthetic_seed: int = _setting(0, "seed of the synthetic set")
    resize: int = _setting(72, "images are resized to resize x resize, then cropped")
    crop: int = _setting(64, "side of the square crop (random in training, centred in evaluation); <= resize; "
                         "a ViT's patch size must divide it, ConvNeXt needs >= 32")
    batch_size: int = _setting(32, "training images per process and step, as in the tutorial")
    eval_batch_size: int = _setting(128, "evaluation images per process and batch")
    num_workers: int = _setting(1, "loader processes per training process")
    max_image_pixels: int = _setting(MAX_IMAGE_PIXELS, "images whose header claims more pixels are refused before "
                                     "decoding (decompression bombs); raise it for huge images")

    arch: str = _setting("resnet18", f"backbone: a torchvision {FAMILY_LIST} model by its "
                         "torchvision name, e.g. resnet50, convnext_tiny, efficientnet_b0, vit_b_16; python -c 'import "
                         "arcface.model as m; print(*m.ARCHS)' lists them", section="model", metavar="ARCH")
    pretrained: str = _setting("", '"", "imagenet" (torchvision\'s DEFAULT weights of the arch) or a local '
                               'checkpoint path')
    pooling: str = _setting("avg", "average or generalised-mean (GeM, learnable p) pooling of the backbone's "
                            "feature map; a ViT has none and embeds with its class token: avg only")
    embedding_dim: int = _setting(0, "0 keeps the pooled feature as the embedding (the reference)")
    scale: float = _setting(64.0, "ArcFace s, as in the recipe")
    margin: float = _setting(0.5, "ArcFace m, radians, as in the recipe")
    margin_file: str = _setting("", "one margin per class, one per line; overrides margin")
    sub_centers: int = _setting(1, "ArcFace weight vectors per class (1: plain ArcFace)")
    easy_margin: bool = _setting(False, "margin only where cos > 0, instead of the large-angle fallback")
    partial_fc: float = _setting(
        0.0, "0: a dense ArcFace head on every process (DDP). r in (0, 1]: Partial FC, the class "
        "centres sharded over the processes and a fraction r of each shard's negative classes "
        "scored per step (1 = all of them: the dense head's result)")

    # 8x the recipe's 0.02: the demo learns from scratch, in six short epochs.
    lr: float = _setting(0.16, "learning rate for a total batch of lr_batch_size images; scaled linearly "
                         "to the real total batch (batch_size x processes x grad_accum_steps)",
                         section="optimisation")
    lr_batch_size: int = _setting(256, "the total batch that lr is given for")
    momentum: float = _setting(0.9, "SGD momentum")
    nesterov: bool = _setting(True, "Nesterov momentum")
    weight_decay: float = _setting(5e-4, "SGD weight decay")
    warmup_epochs: float = _setting(0.5, "epochs of linear warm-up (fractions allowed)")
    warmup_factor: float = _setting(0.01, "warm-up starts at warmup_factor * lr")
    min_lr: float = _setting(0.0, "cosine annealing ends here")
    global_batch_size: int = _setting(
        0, "images per optimizer step over all processes; 0 means batch_size x processes x "
        "grad_accum_steps. When set, grad_accum_steps is derived from it, so the data order, the "
        "schedule and the result do not depend on the number of processes")
    grad_accum_steps: int = _setting(1, "batches whose gradients add up to one optimizer step "
                                     "(derived when global_batch_size is set)")
    clip_grad_norm: float = _setting(0.0, "largest gradient norm; 0 disables clipping")

    device: str = _setting("auto", "auto takes cuda, else mps, else cpu", section="hardware and speed")
    amp: str = _setting("auto", "mixed precision; auto is bf16 on CUDA when supported, else off")
    channels_last: bool = _setting(False, "channels-last memory format for images and weights")
    compile: bool = _setting(False, "torch.compile the model")
    sync_bn: bool = _setting(False, "SyncBatchNorm across processes (CUDA only)")
    collective_timeout_s: float = _setting(
        600.0, "seconds a process waits in a collective for the others before the job stops: a "
        "frozen or lost process ends the run instead of hanging it")

    recall_at: tuple[int, ...] = _setting((1, 5), "K of each Recall@K (must hold 1: recall@1 picks the best "
                                          "epoch)", section="evaluation")
    map_at: tuple[int, ...] = _setting((10,), "K of each mAP@K")
    ap_mode: str = _setting("IR", '"IR" or "integrate" (mmpretrain\'s two AP definitions)')

    def __post_init__(self) -> None:
        _validate(self)

    @property
    def snapshot_path(self) -> Path:
        return Path(self.snapshot) if self.snapshot else Path(self.out_dir) / "snapshot.pt"


# Choices of the code that uses them, so that a new pooling or AP mode needs no edit here. `arch`
# is checked by arcface.model.check_backbone (its ARCHS, too many to list in an error or the help).
_CHOICES = {
    "pooling": POOLINGS,
    "device": ("auto", "cuda", "mps", "cpu"),
    "amp": ("auto", "bf16", "fp16", "off"),
    "ap_mode": AP_MODES,
}
_POSITIVE = {
    "total_epochs", "save_every", "eval_every", "log_every", "synthetic_items", "synthetic_views",
    "synthetic_size", "resize", "crop", "batch_size", "eval_batch_size", "sub_centers",
    "lr_batch_size", "grad_accum_steps", "lr", "scale", "max_image_pixels", "collective_timeout_s",
}
_NON_NEGATIVE = {
    "num_workers", "embedding_dim", "global_batch_size", "partial_fc", "margin", "momentum", "weight_decay", "warmup_epochs",
    "warmup_factor", "min_lr", "clip_grad_norm", "seed", "synthetic_seed",
}
# Upper bounds far past any real job (the reference recipe: 50 epochs, 512 px, 32 images per
# process, 8 processes), so that no run meets them while an extra zero or a wrong unit stops here,
# naming the key, instead of later in an allocation error that names nothing.
_AT_MOST = {
    "total_epochs": 100_000, "save_every": 100_000, "eval_every": 100_000, "log_every": 1_000_000,
    "synthetic_items": 100_000, "synthetic_views": 1_000, "synthetic_size": 8192,
    "resize": 8192, "crop": 8192,
    "batch_size": 65_536, "eval_batch_size": 65_536, "lr_batch_size": 1_048_576, "grad_accum_steps": 65_536,
    "global_batch_size": 1_048_576,
    "num_workers": 256, "embedding_dim": 65_536, "sub_centers": 64, "collective_timeout_s": 7 * 86_400,
    # Seeds stay within 32 bits: every generator takes them, with room for the per-epoch and
    # per-sample seeds derived from them.
    "seed": 2**32 - 1, "synthetic_seed": 2**32 - 1,
}

# Folders the run writes to or generates into: "" would put config.toml, metrics.jsonl and the
# snapshot (or the synthetic set) straight into the working directory.
_FOLDERS = ("out_dir", "synthetic_dir")
# Paths where "" means none; one of only spaces is a slip, not a file name.
_OPTIONAL_PATHS = ("snapshot", "data_root", "pretrained", "margin_file")


def _validate(cfg: Config) -> None:
    for key in _FOLDERS:
        if not str(getattr(cfg, key)).strip():
            raise ConfigError(f"{key}: expected a folder path, got {getattr(cfg, key)!r}")
    for key in _OPTIONAL_PATHS:
        value = getattr(cfg, key)
        if value and not str(value).strip():
            raise ConfigError(f'{key}: expected a path or "" (none), got {value!r}')
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{f.name}: expected a finite number, got {value}")
        if f.name in _POSITIVE and value <= 0:
            raise ConfigError(f"{f.name}: expected a value > 0, got {value!r}")
        if f.name in _NON_NEGATIVE and value < 0:
            raise ConfigError(f"{f.name}: expected a value >= 0, got {value!r}")
        if f.name in _AT_MOST and value > _AT_MOST[f.name]:
            raise ConfigError(f"{f.name}: expected a value <= {_AT_MOST[f.name]}, got {value!r}")
        if f.name in _CHOICES and value not in _CHOICES[f.name]:
            raise ConfigError(f"{f.name}: expected one of {', '.join(_CHOICES[f.name])}, got {value!r}")
    try:
        check_sizes(cfg.resize, cfg.crop)
        check_backbone(cfg.arch, cfg.pooling, cfg.crop)  # one line naming arch, pooling or crop
    except ValueError as error:
        raise ConfigError(str(error)) from None
    if cfg.synthetic_views < 3:
        raise ConfigError(f"synthetic_views: expected >= 3 (a test item needs a query and a gallery view), got {cfg.synthetic_views}")
    for key in ("recall_at", "map_at"):
        ks = getattr(cfg, key)
        if not ks or any(k < 1 for k in ks):
            raise ConfigError(f"{key}: expected a non-empty list of integers >= 1, got {list(ks)!r}")
    if 1 not in cfg.recall_at:
        raise ConfigError(f"recall_at: expected a list holding 1 (recall@1 picks the best epoch), got {list(cfg.recall_at)!r}")
    try:
        check_margin(cfg.margin, "margin")
    except ValueError as error:
        raise ConfigError(str(error)) from None
    if cfg.partial_fc > 1:
        raise ConfigError(f"partial_fc: expected 0 (dense head) or a sampling rate in (0, 1], got {cfg.partial_fc}")
    if cfg.partial_fc and cfg.amp == "fp16":
        # fp16's loss scaler skips a step where one shard's gradient overflows: the shards would
        # have to agree on every skip.
        raise ConfigError("partial_fc: needs amp bf16, auto or off (fp16's loss scaler is per process)")
    if cfg.partial_fc and cfg.compile:
        raise ConfigError("partial_fc: cannot be compiled (its collectives run inside the forward); "
                          "leave compile off")
    if cfg.global_batch_size and cfg.grad_accum_steps != 1:
        raise ConfigError(f"grad_accum_steps: derived from global_batch_size ({cfg.global_batch_size}) when it "
                          f"is set; leave it at 1, got {cfg.grad_accum_steps}")
    if cfg.global_batch_size % cfg.batch_size:
        raise ConfigError(f"global_batch_size: expected a multiple of batch_size ({cfg.batch_size}), "
                          f"got {cfg.global_batch_size}")
    if cfg.warmup_epochs > cfg.total_epochs:
        raise ConfigError(f"warmup_epochs: expected at most total_epochs ({cfg.total_epochs}), got {cfg.warmup_epochs}")


# ------------------------------------------------------------------------------------------
# Field types, TOML and command line


def _field_types() -> dict[str, type]:
    hints = typing.get_type_hints(Config)
    return {f.name: hints[f.name] for f in fields(Config)}


def _did_you_mean(key: str, names: Iterable[str], prefix: str = "") -> str:
    """' (did you mean ...?)' naming the one close name, or '' when none is close enough."""
    match = closest_name(key, names)
    return f" (did you mean {prefix + match!r}?)" if match else ""


def closest_name(key: str, names: Iterable[str]) -> str | None:
    """The one name `key` was most likely meant to be, or None when no name is really close.

    A suggestion that points at an unrelated setting misleads more than none, so only these count,
    tried in order and each only when it picks a single name: the same letters apart from `_`
    (batchsize); an abbreviation of at least 3 letters (pool); a name followed by more words
    (lr_rate, amp_mode: the longest such name); the initials of one side's words (learning_rate ->
    lr, bs -> batch_size); a spelling at most about one letter in five away (embeding_dim).
    """
    key = _normalized(key)
    names = sorted({_normalized(name) for name in names})
    rules = (
        lambda name: key.replace("_", "") == name.replace("_", ""),
        lambda name: len(key) >= 3 and name.startswith(key),
        lambda name: key.startswith(name + "_"),
        lambda name: _initials(key) == name or _initials(name) == key,
    )
    for rule in rules:
        matches = [name for name in names if rule(name)]
        if rule is rules[2] and matches:
            return max(matches, key=len)
        if len(matches) == 1:
            return matches[0]
    close = difflib.get_close_matches(key, names, n=1, cutoff=0.8)
    return close[0] if close else None


def _normalized(name: str) -> str:
    return name.lstrip("-").lower().replace("-", "_")


def _initials(name: str) -> str | None:
    """'learning_rate' -> 'lr'; None for a single word, whose initial would match far too much."""
    words = [word for word in name.split("_") if word]
    return "".join(word[0] for word in words) if len(words) >= 2 else None


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
            raise ConfigError(f"{path}: unknown key {key!r}{_did_you_mean(key, known)}")
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
    """Reports an unknown flag by name, with a valid one only when it is close, and exits with 2."""

    def parse_known_args(self, args: Sequence[str] | None = None, namespace=None):  # type: ignore[override]
        args = sys.argv[1:] if args is None else list(args)
        # Checked before argparse parses: it would hand the value after an unknown flag to the
        # optional positional `total_epochs` and report "invalid int value" instead of the flag.
        unknown = next((flag for flag in map(_flag_of, args[:_end_of_options(args)])
                        if flag is not None and flag not in self._option_names()), None)
        if unknown is not None:
            self._unrecognized(unknown)
        return super().parse_known_args(args, namespace)

    def parse_args(self, args: Sequence[str] | None = None, namespace=None):  # type: ignore[override]
        parsed, unknown = self.parse_known_args(args, namespace)
        if unknown:
            self._unrecognized(unknown[0])
        return parsed

    def _option_names(self) -> set[str]:
        return {name for action in self._actions for name in action.option_strings}

    def _unrecognized(self, arg: str) -> None:
        hint = ""
        if arg.startswith("-"):
            long_names = (name for name in self._option_names() if name.startswith("--"))
            hint = _did_you_mean(arg, long_names, prefix="--")
        self.error(f"unrecognized argument {arg!r}{hint}")


def _end_of_options(args: list[str]) -> int:
    """Index of `--` (after which every argument is a positional), or len(args)."""
    return args.index("--") if "--" in args else len(args)


def _flag_of(arg: str) -> str | None:
    """'--lr=0.1' -> '--lr', '--lr' -> '--lr'; None for values, negative numbers included."""
    if not arg.startswith("-") or arg == "-":
        return None
    try:
        float(arg)
        return None
    except ValueError:
        return arg.split("=", 1)[0]


_HELP_EPILOG = """\
Settings are taken from the defaults, then --config FILE, then --FIELD flags, then the
positionals. Flags take dashes or underscores (--batch-size is --batch_size). A boolean
flag alone means true (--compile); --compile false or --no-compile means false.
"""


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the launcher docstring's lines as written (its usage lines must not be reflowed)."""

    def __init__(self, prog: str) -> None:
        # Room for `--eval_batch_size INT` and its kin, so that their help starts on the same line.
        super().__init__(prog, max_help_position=34)


def arg_parser(description: str | None = None) -> argparse.ArgumentParser:
    """A parser with the tutorial's positionals and one flag per Config field, grouped like the
    dataclass; launchers add their own."""
    parser = _Parser(description=description, epilog=_HELP_EPILOG, formatter_class=_HelpFormatter,
                     allow_abbrev=False,
                     usage="%(prog)s [total_epochs] [save_every] [--config FILE] [--FIELD VALUE ...]")
    parser.add_argument("total_epochs", nargs="?", type=int, default=None,
                        help="epochs to train (overrides --total_epochs and the config)")
    parser.add_argument("save_every", nargs="?", type=int, default=None,
                        help="snapshot every N epochs (overrides --save_every and the config)")
    parser.add_argument("--config", default=None, metavar="FILE",
                        help="TOML file of `field = value` lines (a run's config.toml, configs/*.toml)")
    defaults = Config()
    kinds = _field_types()
    group: argparse._ActionsContainer = parser
    for f in fields(Config):
        if "section" in f.metadata:
            group = parser.add_argument_group(f.metadata["section"])
        _add_field_flags(group, f, kinds[f.name], getattr(defaults, f.name))
    return parser


_METAVARS = {int: "INT", float: "FLOAT", str: "STR"}


def _add_field_flags(group: argparse._ActionsContainer, f: Field, kind: type, default: Any) -> None:
    """--name, shown in the help; --name-with-dashes (and --no-name for a boolean), hidden from it."""
    dashed = f.name.replace("_", "-")
    help_text = f"{f.metadata['help']} (default: {_toml_value(default)})"
    shown: dict[str, Any] = dict(dest=f"opt_{f.name}", default=None,
                                 help=help_text.replace("%", "%%"))  # argparse %-formats help
    if kind is bool:
        # An optional value keeps `--nesterov false`, which configs and docs use, working.
        shown.update(nargs="?", const=True, type=_parse_bool, metavar="{true,false}")
    elif f.name in _CHOICES:
        shown.update(choices=_CHOICES[f.name])
    elif kind in _METAVARS:
        shown.update(type=kind, metavar=f.metadata.get("metavar", _METAVARS[kind]))
    else:  # tuple[int, ...]
        shown.update(type=int, nargs="+", metavar="K")
    group.add_argument(f"--{f.name}", **shown)
    if dashed != f.name:
        group.add_argument(f"--{dashed}", **{**shown, "help": argparse.SUPPRESS})
    if kind is bool:
        group.add_argument(*dict.fromkeys((f"--no-{dashed}", f"--no_{f.name}")), dest=f"opt_{f.name}",
                           action="store_const", const=False, default=None, help=argparse.SUPPRESS)


def _parse_bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    # A boolean flag takes an optional value, so `--compile 5` reads 5 as its value.
    hint = " (put total_epochs and save_every before the flags)" if text.isdigit() else ""
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}{hint}")


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
        check_extras(cfg)
        return cfg
    except ConfigError as e:
        parser.error(str(e))
        raise  # unreachable: parser.error exits


def check_extras(cfg: Config) -> None:
    """Optional packages a setting needs, found before anything is built."""
    if cfg.tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise ConfigError("tensorboard: the tensorboard package is not installed; pip install tensorboard, "
                          "or leave tensorboard off (metrics.jsonl has the same figures)")


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
