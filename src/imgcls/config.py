"""Typed configuration: a tree of dataclasses, loaded from YAML and `key=value` overrides.

OmegaConf does the loading, merging and type checking (including `Literal` choices); this module
turns its exceptions into one-line messages that name the key and suggest the closest valid one.

Order of precedence: dataclass defaults < YAML file (`-c`) < command-line overrides.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Literal, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from imgcls.errors import ImgclsError

__all__ = ["Config", "load_config", "save_config", "config_to_dict", "config_from_dict", "valid_keys"]


@dataclass
class RunConfig:
    name: Optional[str] = None
    """Run folder name under `run.dir`. None: `<dataset>-<model>`, with `-2`, `-3`... when taken."""
    dir: str = "runs"
    """Parent folder of all run folders."""


@dataclass
class DataConfig:
    path: str = ""
    """What to train on: a folder (train/val/test or class folders), a CSV manifest, or a packaged
    dataset name (`fashion-mnist`, `digits`). Set by the DATA argument of `imgcls train`."""
    image_size: Optional[int] = None
    """Side of the square model input, pixels. None: the model's own size (timm), or the median
    image side clipped to 16..64 for the small from-scratch CNN."""
    resize: Literal["crop", "pad", "squish"] = "crop"
    """How an image becomes a square: centre `crop` of the shorter side, `pad` (letterbox, nothing cut
    off), or `squish` (stretch)."""
    augment: Literal["none", "light", "standard"] = "light"
    """Train-time augmentation. light: flip + padded random crop; standard: flip + random resized crop
    + colour jitter. Evaluation never augments."""
    val_fraction: float = 0.1
    """Share of the training images held out for validation when the data has no val split."""
    test_fraction: float = 0.1
    """Share held out for testing when the data is a single folder of class folders with no splits."""
    on_bad_image: Literal["skip", "fail"] = "skip"
    """Unreadable images: `skip` lists them in a warning and leaves them out; `fail` stops."""
    cache: Literal["auto", "on", "off"] = "auto"
    """Decode every image once, resized, into a memory-mapped uint8 file in the cache folder, reused by
    later runs while the files are unchanged. auto: when it fits `data.cache_max_gib`; off: decode the
    files every epoch."""
    cache_max_gib: float = 20.0
    """Disk budget of the decoded-image cache for `data.cache=auto`, GiB."""
    workers: Optional[int] = None
    """DataLoader worker processes. None: chosen from the CPU count and whether the cache is used."""


@dataclass
class ModelConfig:
    name: str = "auto"
    """A timm architecture (`imgcls models` lists them) or `small_resnet`. auto: `small_resnet` for
    images of 64 px or less, `resnet18` otherwise."""
    pretrained: Optional[str] = None
    """Path to a weights file (.safetensors or a PyTorch state_dict) to start from; the classifier
    head is replaced for this dataset's classes."""
    drop_rate: float = 0.0
    """Dropout before the classifier."""


@dataclass
class OptimConfig:
    name: Literal["adamw", "sgd"] = "adamw"
    lr: float = 2e-3
    """Peak learning rate (after warm-up)."""
    weight_decay: float = 0.05
    momentum: float = 0.9
    """SGD only (Nesterov)."""
    scheduler: Literal["cosine", "step", "plateau", "none"] = "cosine"
    """cosine: per-step cosine decay to zero after a linear warm-up; step: multiply by `gamma` every
    `step_epochs`; plateau: multiply by `gamma` when the monitored metric stops improving."""
    warmup_epochs: float = 1.0
    """Linear warm-up length for the cosine schedule, epochs (fractions allowed)."""
    step_epochs: int = 10
    gamma: float = 0.1
    plateau_patience: int = 2
    """Epochs without improvement before the plateau schedule lowers the learning rate."""


@dataclass
class LossConfig:
    name: Literal["ce"] = "ce"
    """Cross-entropy."""
    label_smoothing: float = 0.0


@dataclass
class TrainConfig:
    epochs: int = 10
    batch_size: int = 64
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """auto: bf16 autocast on CUDA and on CPUs with native bf16, fp16 + loss scaling on older GPUs."""
    deterministic: bool = False
    """Deterministic kernels and data order: a resumed run ends exactly where an uninterrupted one does."""
    compile: bool = False
    """torch.compile the model: slower start (compilation, ~1 min), faster steps on long runs."""
    grad_clip: Optional[float] = None
    """Clip the gradient norm to this value; None: no clipping."""
    monitor: Literal["val_acc1", "val_loss", "val_balanced_acc", "val_macro_f1"] = "val_acc1"
    """Metric that picks the best checkpoint and drives early stopping and the plateau schedule."""
    patience: Optional[int] = None
    """Stop after this many epochs without improvement of `train.monitor`; None: never stop early."""
    log_every: int = 200
    """Batches between progress lines when the output is not a terminal."""


@dataclass
class Config:
    seed: int = 42
    device: str = "auto"
    """auto (cuda, then mps, then cpu), or a torch device string such as `cpu` or `cuda:1`."""
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


def valid_keys(node: type = Config, prefix: str = "") -> list[str]:
    """Every dotted key of the config tree, e.g. `train.epochs`."""
    keys = []
    for item in fields(node):
        if is_dataclass(item.type) or (isinstance(item.type, str) and item.type.endswith("Config")):
            keys += valid_keys(_section_type(node, item.name), f"{prefix}{item.name}.")
        else:
            keys.append(prefix + item.name)
    return keys


def _section_type(node: type, name: str) -> type:
    return type(getattr(node(), name))


def _closest(key: str) -> str:
    """A hint for an unknown key: the closest valid key, else the keys of its section, else the sections."""
    keys = valid_keys()
    match = difflib.get_close_matches(key, keys, n=1, cutoff=0.5)
    if match:
        return f"; did you mean '{match[0]}'?"
    section = key.split(".", 1)[0]
    in_section = [k for k in keys if k.startswith(section + ".")]
    if in_section:
        return f"; valid keys in '{section}': {', '.join(in_section)}"
    sections = sorted({k.split(".", 1)[0] for k in keys}, key=[k.split(".", 1)[0] for k in keys].index)
    return f"; valid top-level keys: {', '.join(sections)}"


def _explain(error: OmegaConfBaseException, source: str, key: str = "?") -> ImgclsError:
    full_key = getattr(error, "full_key", None)
    # OmegaConf names the first unknown part ("trian"); the whole override key ("trian.epochs") matches better
    key = key if full_key and key.startswith(full_key) else (full_key or key)
    if isinstance(error, ConfigKeyError):
        return ImgclsError(f"unknown config key '{key}' in {source}{_closest(key)}")
    if isinstance(error, ValidationError):
        reason = str(error).splitlines()[0]
        return ImgclsError(f"bad value for '{key}' in {source}: {reason}")
    return ImgclsError(f"config error at '{key}' in {source}: {str(error).splitlines()[0]}")


def _merge(base: DictConfig, other: Any, source: str, key: str = "?") -> DictConfig:
    try:
        return OmegaConf.merge(base, other)
    except OmegaConfBaseException as error:
        raise _explain(error, source, key) from error


def load_config(file: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Build a validated Config from defaults, an optional YAML file and `key=value` overrides.

    Raises:
        ImgclsError: unreadable file, unknown key (with the closest valid key) or a bad value.
    """
    merged = OmegaConf.structured(Config)
    if file is not None:
        path = Path(file)
        if not path.is_file():
            raise ImgclsError(f"config file not found: {path}")
        try:
            loaded = OmegaConf.load(path)
        except Exception as error:  # yaml errors come in several types
            raise ImgclsError(f"cannot read config file {path}: {str(error).splitlines()[0]}") from error
        merged = _merge(merged, loaded, str(path))
    for override in overrides:
        if "=" not in override:
            raise ImgclsError(f"override '{override}' is not key=value (e.g. train.epochs=5)")
        try:
            dotlist = OmegaConf.from_dotlist([override])
        except OmegaConfBaseException as error:
            raise ImgclsError(f"cannot parse override '{override}': {str(error).splitlines()[0]}") from error
        merged = _merge(merged, dotlist, f"override '{override}'", override.split("=", 1)[0])
    config: Config = OmegaConf.to_object(merged)
    _check_ranges(config)
    return config


def _check_ranges(config: Config) -> None:
    """Values that have the right type but make no sense."""
    checks = [
        ("train.epochs", config.train.epochs >= 1, "must be at least 1"),
        ("train.batch_size", config.train.batch_size >= 1, "must be at least 1"),
        ("optim.lr", config.optim.lr > 0, "must be positive"),
        ("data.val_fraction", 0 < config.data.val_fraction < 1, "must be between 0 and 1"),
        ("data.test_fraction", 0 <= config.data.test_fraction < 1, "must be between 0 and 1"),
        ("loss.label_smoothing", 0 <= config.loss.label_smoothing < 1, "must be in [0, 1)"),
        ("data.image_size", config.data.image_size is None or config.data.image_size >= 8, "must be at least 8"),
        ("train.patience", config.train.patience is None or config.train.patience >= 1, "must be at least 1"),
    ]
    for key, ok, requirement in checks:
        if not ok:
            raise ImgclsError(f"bad value for '{key}': {requirement}")


def config_to_dict(config: Config) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(config))


def config_from_dict(values: dict) -> Config:
    """Rebuild a Config saved by `save_config` or stored in a checkpoint."""
    return OmegaConf.to_object(_merge(OmegaConf.structured(Config), values, "saved config"))


def save_config(config: Config, path: str | Path) -> None:
    Path(path).write_text(OmegaConf.to_yaml(OmegaConf.structured(config)))
