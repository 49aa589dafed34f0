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
from arcface.model import FAMILY_LIST, POOLINGS, check_backbone, is_timm_arch
from arcface.param_groups import OPTIMIZERS, check_layer_decay
from arcface.textfile import DataError, read_text
from arcface.transforms import MAX_IMAGE_PIXELS, check_sizes
from support.errors import UserError


# The values of `pretrained` that name weights rather than a file.
PRETRAINED_NAMES = ("", "imagenet", "timm")


class ConfigError(UserError, ValueError):
    """A configuration key or value that cannot be used; the message names the key."""

    exit_status = 2  # argparse's status for a bad command line


def _setting(default: Any, help: str, section: str | None = None, metavar: str | None = None, *,
             resumable: bool = False, identity: bool = False, path: str | None = None,
             choices: Sequence[str] | None = None, above: float | None = None,
             at_least: float | None = None, at_most: float | None = None,
             below: float | None = None) -> Any:
    """A Config field with every fact about it, so that adding a field is one line here.

    help: its `--help` text; `section` starts a new group of the help there; `metavar` names the
    value in the help (default: INT, FLOAT, STR).
    resumable: a resumed run may change it (how long the run is, how often it saves, evaluates
      and logs, where its files are, how fast it computes). Any other field shapes the training
      itself: a change on resume would make config.toml describe a run that never happened.
    identity: it decides what a run is; a snapshot made with another value belongs to another run.
    path: "folder" (written to; never ""), "input" (read; "" means none) or "output" (a file
      written; "" means the default); paths are compared by the file they name, not their spelling.
    choices, above (> x), at_least (>= x), at_most (<= x), below (< x): the values it accepts.
    """
    facts = {"help": help, "section": section, "metavar": metavar, "resumable": resumable,
             "identity": identity, "path": path, "choices": choices,
             "above": above, "at_least": at_least, "at_most": at_most, "below": below}
    if path not in (None, "folder", "input", "output"):
        raise ValueError(f"_setting: path must be folder, input or output, got {path!r}")
    return field(default=default, metadata={k: v for k, v in facts.items() if v is not None and v is not False})


@dataclass(frozen=True)
class Config:
    """Every setting of a job.

    Each field carries its `--help` text, so the help cannot drift from the source; the field
    that names a `section` opens that group of the help (and of this class).
    """

    total_epochs: int = _setting(6, "epochs to train", section="run length and outputs",
                                 resumable=True, above=0, at_most=100_000)
    save_every: int = _setting(1, "snapshot every N epochs (and always at the end)",
                               resumable=True, above=0, at_most=100_000)
    eval_every: int = _setting(3, "evaluate every N epochs (and always before training and at the end)",
                               resumable=True, above=0, at_most=100_000)
    out_dir: str = _setting("runs/demo", "folder of the run: config.toml, metrics.jsonl, the snapshot",
                            resumable=True, path="folder")
    snapshot: str = _setting("", 'snapshot file; "" means <out_dir>/snapshot.pt', resumable=True, path="output")
    # Seeds stay within 32 bits: every generator takes them, with room for the per-epoch and
    # per-sample seeds derived from them.
    seed: int = _setting(0, "seed of the initial weights, the shuffling and the augmentation",
                         at_least=0, at_most=2**32 - 1)
    log_every: int = _setting(10, "optimizer steps between progress-bar updates",
                              resumable=True, above=0, at_most=1_000_000)
    tensorboard: bool = _setting(False, "also write metrics.jsonl's scalars as TensorBoard events in "
                                 "<out_dir>/tensorboard (needs: pip install tensorboard)", resumable=True)

    data_root: str = _setting("", 'In-Shop root (Eval/ and Img/); "" trains on the synthetic set',
                              section="data", identity=True, path="input")
    synthetic_dir: str = _setting(".cache/synthetic", "where the synthetic set is generated once",
                                  resumable=True, path="folder")
    synthetic_items: int = _setting(300, "items (identities) of the synthetic set",
                                    identity=True, above=0, at_most=100_000)
    synthetic_views: int = _setting(12, "images of each synthetic item (at least 3)",
                                    identity=True, above=0, at_most=1_000)
    synthetic_size: int = _setting(64, "side of the generated JPEGs", identity=True, above=0, at_most=8192)
    synthetic_seed: int = _setting(0, "seed of the synthetic set", identity=True, at_least=0, at_most=2**32 - 1)
    resize: int = _setting(72, "images are resized to resize x resize, then cropped", above=0, at_most=8192)
    crop: int = _setting(64, "side of the square crop (random in training, centred in evaluation); <= resize; "
                         "a ViT's patch size must divide it, ConvNeXt needs >= 32", above=0, at_most=8192)
    batch_size: int = _setting(32, "training images per process and step, as in the tutorial",
                               resumable=True, above=0, at_most=65_536)
    eval_batch_size: int = _setting(128, "evaluation images per process and batch",
                                    resumable=True, above=0, at_most=65_536)
    num_workers: int = _setting(1, "loader processes per training process", resumable=True, at_least=0, at_most=256)
    max_image_pixels: int = _setting(MAX_IMAGE_PIXELS, "images whose header claims more pixels are refused before "
                                     "decoding (decompression bombs); raise it for huge images",
                                     resumable=True, above=0)

    arch: str = _setting("resnet18", f"backbone: a torchvision {FAMILY_LIST} model by its "
                         "torchvision name, e.g. resnet50, convnext_tiny, efficientnet_b0, vit_b_16; python -c 'import "
                         "arcface.model as m; print(*m.ARCHS)' lists them; or timm/NAME[.TAG], any timm model "
                         "(pip install timm), e.g. timm/vit_small_patch16_224.dino, whose preprocessing the "
                         "tag decides", section="model", metavar="ARCH", identity=True)
    pretrained: str = _setting("", '"", "imagenet" (torchvision\'s DEFAULT weights of a torchvision arch), "timm" '
                               '(the weights of a timm arch\'s tag) or a local checkpoint path (.safetensors '
                               'or torch)', path="input")
    pooling: str = _setting("avg", "average or generalised-mean (GeM, learnable p) pooling of the backbone's "
                            "feature map; a ViT has none and embeds with its class token: avg only",
                            identity=True, choices=POOLINGS)
    embedding_dim: int = _setting(0, "0 keeps the pooled feature as the embedding (the reference)",
                                  identity=True, at_least=0, at_most=65_536)
    scale: float = _setting(64.0, "ArcFace s, as in the recipe", above=0)
    margin: float = _setting(0.5, "ArcFace m, radians, as in the recipe", at_least=0)
    margin_file: str = _setting("", "one margin per class, one per line; overrides margin", path="input")
    sub_centers: int = _setting(1, "ArcFace weight vectors per class (1: plain ArcFace)",
                                identity=True, above=0, at_most=64)
    easy_margin: bool = _setting(False, "margin only where cos > 0, instead of the large-angle fallback")
    drop_path: float = _setting(0.0, "stochastic depth rate of a timm trunk (timm's drop_path_rate); "
                                "torchvision trunks keep their builders' own and take 0 only", at_least=0, below=1)
    partial_fc: float = _setting(
        0.0, "0: a dense ArcFace head on every process (DDP). r in (0, 1]: Partial FC, the class "
        "centres sharded over the processes and a fraction r of each shard's negative classes "
        "scored per step (1 = all of them: the dense head's result)", at_least=0)

    # 8x the recipe's 0.02: the demo learns from scratch, in six short epochs.
    lr: float = _setting(0.16, "learning rate for a total batch of lr_batch_size images; scaled linearly "
                         "to the real total batch (batch_size x processes x grad_accum_steps)",
                         section="optimisation", above=0)
    lr_batch_size: int = _setting(256, "the total batch that lr is given for", above=0, at_most=1_048_576)
    optimizer: str = _setting("sgd", "sgd (the reference recipe) or adamw (decoupled weight decay, the "
                              "fine-tuning recipes of foundation backbones)", choices=OPTIMIZERS)
    momentum: float = _setting(0.9, "SGD momentum", at_least=0)
    nesterov: bool = _setting(True, "Nesterov momentum (SGD)")
    adam_beta1: float = _setting(0.9, "AdamW's beta1 (first-moment decay)", at_least=0, below=1)
    adam_beta2: float = _setting(0.999, "AdamW's beta2 (second-moment decay)", at_least=0, below=1)
    adam_eps: float = _setting(1e-8, "AdamW's epsilon", above=0)
    weight_decay: float = _setting(5e-4, "weight decay: SGD's L2 term, AdamW's decoupled decay", at_least=0)
    decay_norm_and_bias: bool = _setting(
        True, "weight decay on every parameter (the reference recipe); false spares biases, norm "
        "weights, GeM's p and other 1-d parameters, position embeddings, class tokens and Swin's "
        "relative position tables")
    layer_decay: float = _setting(
        1.0, "layer-wise lr decay d over a ViT, ConvNeXt or Swin trunk (torchvision's or any timm model's "
        "blocks): block i of L trains at lr x d^(L+1-i), the stem at lr x d^(L+1), the final norm, "
        "pooling, projection and head at lr; 1 is off", above=0, at_most=1)
    head_lr_mult: float = _setting(1.0, "the ArcFace head's lr as a multiple of lr (dense or Partial FC)",
                                   above=0, at_most=1000)
    warmup_epochs: float = _setting(0.5, "epochs of linear warm-up (fractions allowed)", at_least=0)
    warmup_factor: float = _setting(0.01, "warm-up starts at warmup_factor * lr", at_least=0)
    min_lr: float = _setting(0.0, "cosine annealing ends here", at_least=0)
    global_batch_size: int = _setting(
        0, "images per optimizer step over all processes; 0 means batch_size x processes x "
        "grad_accum_steps. When set, grad_accum_steps is derived from it, so the data order, the "
        "schedule and the result do not depend on the number of processes",
        resumable=True, at_least=0, at_most=1_048_576)
    grad_accum_steps: int = _setting(1, "batches whose gradients add up to one optimizer step "
                                     "(derived when global_batch_size is set)",
                                     resumable=True, above=0, at_most=65_536)
    clip_grad_norm: float = _setting(0.0, "largest gradient norm; 0 disables clipping", at_least=0)

    device: str = _setting("auto", "auto takes cuda, else mps, else cpu", section="hardware and speed",
                           resumable=True, choices=("auto", "cuda", "mps", "cpu"))
    amp: str = _setting("auto", "mixed precision; auto is bf16 on CUDA when supported, else off",
                        resumable=True, choices=("auto", "bf16", "fp16", "off"))
    channels_last: bool = _setting(False, "channels-last memory format for images and weights", resumable=True)
    compile: bool = _setting(False, "torch.compile the model", resumable=True)
    sync_bn: bool = _setting(False, "SyncBatchNorm across processes (CUDA only)")
    # At least a second: shorter, a collective fails on scheduling jitter alone.
    collective_timeout_s: float = _setting(
        600.0, "seconds a process waits in a collective for the others before the job stops: a "
        "frozen or lost process ends the run instead of hanging it", resumable=True, at_least=1.0,
        at_most=7 * 86_400)

    recall_at: tuple[int, ...] = _setting((1, 5), "K of each Recall@K (must hold 1: recall@1 picks the best "
                                          "epoch)", section="evaluation", resumable=True)
    map_at: tuple[int, ...] = _setting((10,), "K of each mAP@K", resumable=True)
    ap_mode: str = _setting("IR", '"IR" or "integrate" (mmpretrain\'s two AP definitions)',
                            resumable=True, choices=AP_MODES)

    def __post_init__(self) -> None:
        _validate(self)

    @property
    def snapshot_path(self) -> Path:
        return Path(self.snapshot) if self.snapshot else Path(self.out_dir) / "snapshot.pt"


def facts(name: str) -> dict[str, Any]:
    """What the `_setting` of field `name` declares (help, bounds, choices, resume policy...)."""
    return dict(next(f for f in fields(Config) if f.name == name).metadata)


def fields_where(fact: str, value: Any = True) -> tuple[str, ...]:
    """Names of the Config fields whose `_setting` says `fact` = `value` (path kinds: "folder", ...)."""
    return tuple(f.name for f in fields(Config) if f.metadata.get(fact) == value)


# The tables other modules read, derived from the fields' own declarations.
RESUMABLE = fields_where("resumable")
RUN_IDENTITY = fields_where("identity")
PATH_FIELDS = tuple(f.name for f in fields(Config) if "path" in f.metadata)


def _validate(cfg: Config) -> None:
    for f in fields(cfg):
        _check_field(f, getattr(cfg, f.name))
    try:
        check_sizes(cfg.resize, cfg.crop)
        check_backbone(cfg.arch, cfg.pooling, cfg.crop, cfg.drop_path)  # one line naming the key
        if cfg.layer_decay < 1:
            check_layer_decay(cfg.arch, cfg.crop)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    _check_weights_source(cfg)
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


def _check_weights_source(cfg: Config) -> None:
    """"imagenet" names torchvision's weights, "timm" a timm tag's: each only for its own kind of arch."""
    timm = is_timm_arch(cfg.arch)
    if cfg.pretrained == "imagenet" and timm:
        raise ConfigError(f'pretrained: "imagenet" means torchvision\'s weights; {cfg.arch} is a timm arch: '
                          f'use pretrained = "timm" (the weights of its tag) or a checkpoint path')
    if cfg.pretrained == "timm" and not timm:
        raise ConfigError(f'pretrained: "timm" loads the weights of a timm arch ("timm/NAME.TAG"); for '
                          f'torchvision\'s {cfg.arch} use "imagenet" or a checkpoint path')


# Upper bounds (at_most) lie far past any real job (the reference recipe: 50 epochs, 512 px, 32
# images per process, 8 processes), so that no run meets them while an extra zero or a wrong unit
# stops here, naming the key, instead of later in an allocation error that names nothing. (A
# fraction's at_most, such as layer_decay <= 1, is its range instead.)
def _check_field(f: Field, value: Any) -> None:
    """One field's own rules, from its `_setting`: path, finite, bounds and choices."""
    facts, name = f.metadata, f.name
    if facts.get("path") == "folder" and not str(value).strip():
        # "" would put config.toml, metrics.jsonl and the snapshot into the working directory.
        raise ConfigError(f"{name}: expected a folder path, got {value!r}")
    if facts.get("path") in ("input", "output") and value and not str(value).strip():
        raise ConfigError(f'{name}: expected a path or "" (none), got {value!r}')  # spaces: a slip
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{name}: expected a finite number, got {value}")
    if "above" in facts and value <= facts["above"]:
        raise ConfigError(f"{name}: expected a value > {facts['above']:g}, got {value!r}")
    if "at_least" in facts and value < facts["at_least"]:
        raise ConfigError(f"{name}: expected a value >= {facts['at_least']:g}, got {value!r}")
    if "at_most" in facts and value > facts["at_most"]:
        raise ConfigError(f"{name}: expected a value <= {facts['at_most']}, got {value!r}")
    if "below" in facts and value >= facts["below"]:
        raise ConfigError(f"{name}: expected a value < {facts['below']:g}, got {value!r}")
    if "choices" in facts and value not in facts["choices"]:
        raise ConfigError(f"{name}: expected one of {', '.join(facts['choices'])}, got {value!r}")


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
        ok = isinstance(value, (list, tuple)) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
        value = tuple(value) if ok else value
    if not ok:
        raise ConfigError(f"{where}{key}: expected {_type_name(kind)}, got {value!r}")
    return value


def _type_name(kind: type) -> str:
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(
        kind, "a list of integers"
    )


def to_plain(cfg: Config) -> dict[str, Any]:
    """The configuration as plain data (lists for tuples): what TOML, snapshots and tools hold."""
    return {f.name: list(value) if isinstance(value := getattr(cfg, f.name), tuple) else value
            for f in fields(cfg)}


def plain_values(raw: dict[str, Any], where: str = "", unknown: str = "refuse") -> dict[str, Any]:
    """Plain data (a TOML table, a snapshot's config) -> typed field values, checked key by key;
    errors start with `where`. unknown="refuse" names a key that is not a field (with a close
    name when there is one); "skip" leaves it out (a snapshot of a later version)."""
    known = set(_field_types())
    values = {}
    for key, value in raw.items():
        if key not in known:
            if unknown == "skip":
                continue
            raise ConfigError(f"{where}unknown key {key!r}{_did_you_mean(key, known)}")
        values[key] = _coerce(key, value, where)
    return values


def from_plain(raw: dict[str, Any], where: str = "", unknown: str = "refuse") -> Config:
    """`to_plain`'s inverse: a Config from plain data, every value checked."""
    values = plain_values(raw, where, unknown)
    try:
        return Config(**values)
    except ConfigError as error:
        raise ConfigError(f"{where}{error}") from None


# A config file is a few kilobytes; a larger "file" is a mistake (a device, a data file).
MAX_CONFIG_BYTES = 1 << 20


def load_toml(path: str | Path) -> dict[str, Any]:
    """Reads a flat TOML file of Config fields; unknown keys and wrong types name the file and key."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: config file not found")
    if not path.is_file():
        raise ConfigError(f"{path}: expected a TOML file, got a {'folder' if path.is_dir() else 'special file'}")
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path}: {path.stat().st_size} bytes is not a config file "
                          f"(expected a TOML file of at most {MAX_CONFIG_BYTES} bytes)")
    try:
        # Decoded here rather than by tomllib, so that a byte that is not UTF-8 is reported with
        # its line; tomllib's own message would name neither.
        raw = tomllib.loads(read_text(path))
    except (DataError, OSError) as e:
        raise ConfigError(str(e)) from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    return plain_values(raw, f"{path}: ")


def dump_toml(cfg: Config) -> str:
    """The resolved configuration as TOML that `load_toml` reads back to the same Config."""
    return "".join(f"{key} = {_toml_value(value)}\n" for key, value in to_plain(cfg).items())


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
    elif "choices" in f.metadata:
        shown.update(choices=f.metadata["choices"])
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
    if cfg.pretrained not in PRETRAINED_NAMES and not Path(cfg.pretrained).is_file():
        raise ConfigError(f"pretrained: expected \"imagenet\", \"timm\" or a checkpoint file; no such file "
                          f"{cfg.pretrained}")
    for key, folder in (("out_dir", Path(cfg.out_dir)), ("snapshot", cfg.snapshot_path.parent)):
        if any(parent.exists() and not parent.is_dir() for parent in (folder, *folder.parents)):
            raise ConfigError(f"{key}: {folder} cannot be a folder (a file is in the way)")
