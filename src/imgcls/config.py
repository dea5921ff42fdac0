"""Typed configuration: a tree of dataclasses, loaded from YAML and `key=value` overrides.

OmegaConf does the loading, merging and type checking (including `Literal` choices); this module
turns its exceptions into one-line messages that name the key and suggest the closest valid one.

Order of precedence: dataclass defaults < YAML file (`-c`) < command-line overrides.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Literal, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from imgcls.errors import ImgclsError

__all__ = ["Config", "load_config", "save_config", "config_to_dict", "config_from_dict", "valid_keys", "run_name_problem"]


@dataclass
class RunConfig:
    name: Optional[str] = None
    """Run folder name under `run.dir`: one folder name (no `/`, `.` or `..`). None: `<dataset>-<model>`,
    with `-2`, `-3`... when taken."""
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
    augment: Literal["auto", "none", "light", "standard", "strong"] = "auto"
    """Train-time augmentation preset. light: flip + padded random crop; standard: flip + random resized
    crop + colour jitter; strong: standard + RandAugment + random erasing (timm's strong recipes).
    auto: light, except for images of 64 px or less in runs under 10 epochs, which learn faster
    unaugmented: none (with `train.max_minutes`, decided each epoch from the epochs the budget plans; the
    first is unaugmented).
    Evaluation never augments."""
    horizontal_flip: Optional[bool] = None
    """Mirror images left-right in the light, standard and strong presets, and in test-time augmentation
    (`--tta`). false for data where a mirror image is another class: text, digits, left/right road signs,
    chirality. None (or `auto`): false when a nearest-neighbour check on the training images recognises
    their mirror images less than half as often as the images themselves (digits: 34% vs 99%), else true."""
    auto_augment: Literal["none", "randaugment", "trivialaugment", "autoaugment"] = "none"
    """Learned or random augmentation policy, drawn per image, after the preset: RandAugment (2
    operations at magnitude 9 of 30), TrivialAugment (1 operation at a random magnitude) or AutoAugment
    (ImageNet policy). none: the preset's own (RandAugment for strong, else nothing)."""
    color_jitter: Optional[float] = None
    """Brightness, contrast and saturation factors drawn from 1 +- this. None: the preset's own (0.3
    for standard and strong, else none); 0: off."""
    random_erasing: float = 0.0
    """Probability that an image gets one rectangle (2-33% of its area) filled with grey. 0: the
    preset's own (0.25 for strong, else none)."""
    mixup_alpha: float = 0.0
    """MixUp: blend each training image with another of the batch, weight ~ Beta(alpha, alpha); targets
    blended alike. 0: off; DeiT-style timm recipes use 0.8."""
    cutmix_alpha: float = 0.0
    """CutMix: paste a box of another image of the batch, area share ~ Beta(alpha, alpha); targets
    weighted by area. 0: off; timm's recipes use 1.0."""
    mix_probability: float = 1.0
    """Share of the batches that are mixed when `mixup_alpha` or `cutmix_alpha` is positive; with both,
    each mixed batch uses one of the two, 50/50."""
    val_fraction: float = 0.1
    """Share of the training images held out for validation when the data has no val split."""
    test_fraction: float = 0.1
    """Share held out for testing when the data is a single folder of class folders with no splits."""
    split_seed: int = 0
    """Seed of the splits made for data without them (val, test, the `data.fraction` subset, the folds
    of `imgcls cv`). Apart from `seed` on purpose: runs with different seeds are then compared on the
    same images."""
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
    sampler: Literal["random", "balanced"] = "random"
    """random: every image once per epoch; balanced: draw images with probability 1/(their class count),
    so every class is seen about equally often (long-tailed data)."""
    fraction: float = 1.0
    """Share of the training images to use (stratified, seeded): a quick first run on a subset."""
    per_class_limit: Optional[int] = None
    """At most this many training images per class (applied after `data.fraction`)."""
    label_separator: str = "|"
    """What joins the labels of one image in the `labels` column of a multi-label CSV manifest."""


@dataclass
class ModelConfig:
    name: str = "auto"
    """A timm architecture (`imgcls models` lists them), `small_resnet` or `small_convnet`. auto: `small_resnet`
    for images of 64 px or less (with `train.max_minutes`, `small_convnet` when the budget buys 4 to 40
    epochs of small_resnet at the speed measured on this machine; see `model.width`), `resnet18` otherwise."""
    pretrained: Optional[str] = None
    """Weights to start from: `imagenet` (EfficientNet-Lite0's install with imgcls and work offline;
    other timm models download timm's when online), or a path to a .safetensors / PyTorch state_dict
    file. The classifier head is replaced for this dataset's classes."""
    drop_rate: float = 0.0
    """Dropout before the classifier (and before its output layer when there is a hidden layer)."""
    head_hidden: Optional[int] = None
    """Width of a hidden layer in the classifier head (Linear -> ReLU -> dropout -> Linear, as fastai's
    head); None: one linear layer, as timm and torchvision build it."""
    freeze_epochs: int = 0
    """Train only the classifier head for this many epochs, then everything (transfer learning)."""
    width: Optional[int] = None
    """small_resnet: channels of the first of its three stages; each next stage doubles them. 16 trains
    about 3x more images per second on a CPU (a quarter of the operations), 64 about 3.5x fewer.
    small_convnet: channels of the first of its three groups; the next two have 4x as many.
    None (or `auto`): small_convnet 64; small_resnet 32, or with `model.blocks` also auto and
    `train.max_minutes`, 16 (with 2 blocks) when the budget buys fewer than 8 epochs of the 32-wide, 1-block
    network at the speed measured on this machine, and 32 with 2 blocks when it buys 10 or more. With
    `model.name=auto`, a budget of 4 to 8 takes small_convnet 32 instead, of 8 to 40 small_convnet 64 (under
    4, 16/2; from 40, 32/2); a run that `train.epochs` ends first keeps small_resnet 32/1."""
    blocks: Optional[int] = None
    """small_resnet: residual blocks per stage (1: 7 convolutions deep; 2: 13; 3: ResNet-20's 19).
    None (or `auto`): 1, or 2 when a time budget is short or long for the 1-block network (`model.width`)."""
    zero_init_residual: bool = False
    """small_resnet: start each residual block as the identity (its last BatchNorm weight at 0), as deep
    ResNets are trained; off, the default, learns faster in the first epochs of this shallow network."""
    tta: Literal["auto", "none", "flip", "crops"] = "auto"
    """Test-time augmentation built into the trained model: evaluation, calibration, `predict`, `serve` and
    the ONNX export answer with the mean of the logits of several views of each image; the artifact records
    it as `tta`. flip: the image and its mirror image (twice the inference time). crops: the image, its mirror
    image (unless data.horizontal_flip is false) and its shifts by 1/16 of the side (at least 1 px) up,
    down, left and right: the views of `--tta crops` (6 passes, or 5). auto: crops for images of 64 px or
    less when the best epoch trained on mirror images and shifted crops (`data.horizontal_flip` and an
    augmentation other than none), none otherwise. Validation during training is always plain. `--tta` of eval and predict adds
    views on top of flip (none on top of crops)."""


@dataclass
class OptimConfig:
    name: Literal["adamw", "sgd"] = "adamw"
    lr: float = 2e-3
    """Peak learning rate (after warm-up)."""
    weight_decay: float = 0.05
    momentum: float = 0.9
    """SGD only (Nesterov)."""
    backbone_lr_ratio: float = 1.0
    """The backbone's learning rate as a share of `optim.lr` (the head gets `optim.lr`); e.g. 0.1 when
    fine-tuning pretrained weights."""
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
    name: Literal["auto", "ce", "focal", "bce", "asl"] = "auto"
    """auto: ce for single-label, bce for multi-label. ce: cross-entropy; focal: focal loss, which
    down-weights easy examples (long-tailed data; per label for multi-label); bce: binary cross-entropy
    per label (multi-label); asl: asymmetric loss (Ridnik et al. 2021, multi-label with many negatives:
    easy negatives count less, and those below `asl_clip` not at all)."""
    label_smoothing: Optional[float] = None
    """Share of each target spread evenly over all classes (cross-entropy and focal loss; bce: over 0 and 1).
    None (or `auto`): 0.1 for `small_resnet` with cross-entropy on single-label data (Fashion-MNIST in a
    10-minute budget: val 0.937 vs 0.934 over 5 seeds, McNemar p < 0.001; the temperature fitted after
    training undoes its underconfidence), otherwise 0."""
    class_weights: Literal["none", "auto"] = "none"
    """auto: weight each class by n_images / (n_classes * its training count), so rare classes count
    more; multi-label: each label's positives by its negatives / positives (bce's pos_weight)."""
    focal_gamma: float = 2.0
    """Focal loss focusing strength; 0 is cross-entropy."""
    asl_gamma_negative: float = 4.0
    """ASL focusing strength on negative labels (the paper's default)."""
    asl_gamma_positive: float = 0.0
    """ASL focusing strength on positive labels."""
    asl_clip: float = 0.05
    """ASL probability margin: a negative label predicted below this costs nothing."""


@dataclass
class TrainConfig:
    epochs: Optional[int] = None
    """Passes over the training images. None (or `auto`): 10, or with `train.max_minutes` as many as the
    budget allows; with both, whichever ends first."""
    batch_size: Optional[int] = None
    """Images per batch (per process under torchrun). None (or `auto`): 64, halved down to 16 while an
    epoch would have fewer than 100 batches: small datasets learn faster from more, smaller steps
    (digits, 1,295 training images: batch 16)."""
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """auto: bf16 autocast on CUDA and on CPUs with native bf16, fp16 + loss scaling on older GPUs."""
    deterministic: bool = False
    """Deterministic kernels and data order: a resumed run ends exactly where an uninterrupted one does."""
    compile: bool = False
    """torch.compile the model: slower start (compilation, ~1 min), faster steps on long runs."""
    grad_clip: Optional[float] = None
    """Clip the gradient norm to this value; None: no clipping."""
    monitor: Literal["auto", "val_acc1", "val_loss", "val_balanced_acc", "val_macro_f1", "val_map", "val_f1_micro",
                     "val_f1_macro", "val_subset_acc"] = "auto"
    """Metric that picks the best checkpoint and drives early stopping and the plateau schedule. auto:
    val_acc1 for single-label, val_map (mean average precision over the labels) for multi-label."""
    patience: Optional[int] = None
    """Stop after this many epochs without improvement of `train.monitor`; None: never stop early."""
    log_every: int = 200
    """Batches between progress lines when the output is not a terminal."""
    accumulate: int = 1
    """Gradient accumulation: batches per optimiser step (effective batch = batch_size x accumulate)."""
    ema: bool = False
    """Keep an exponential moving average of the weights, evaluated and checkpointed beside the raw
    weights; the better of the two becomes `best` and the model artifact."""
    ema_decay: float = 0.999
    """EMA decay per optimiser step (with timm's warm-up, so early averages are not dominated by the start)."""
    max_minutes: Optional[float] = None
    """Time budget of the whole run, minutes, from reading the data to the final test evaluation. The
    learning-rate schedule (warm-up, cosine decay) is laid out over the steps the budget allows, planned
    from the measured speed of the first steps and corrected after every epoch; the last epoch may be
    partial. None: no budget."""
    calibrate: bool = True
    """After training, fit a softmax temperature on the validation split (calibrated confidences; the
    predicted classes never change) and store it in the model artifact, which `predict` uses."""
    reject_precision: float = 0.95
    """Target precision of the `imgcls predict --reject auto` threshold, chosen on the validation split."""


@dataclass
class TrackingConfig:
    tensorboard: bool = True
    """Write TensorBoard event files (scalars, learning rate, confusion matrix) to <run>/tensorboard/
    when the tensorboard package is installed; `tensorboard --logdir runs` shows every run."""
    mlflow: bool = False
    """Log params, per-epoch metrics, the run folder's files and the model to MLflow."""
    mlflow_uri: Optional[str] = None
    """MLflow tracking URI (e.g. http://host:5000); None: the local store that `mlflow ui`, started
    in the same directory, shows."""
    mlflow_experiment: str = "imgcls"
    """MLflow experiment name."""


@dataclass
class Config:
    seed: int = 42
    task: Literal["auto", "single", "multi"] = "auto"
    """single: one class per image (softmax); multi: any number of classes per image (one sigmoid per
    class). auto: multi when the data is a manifest with a `labels` column, else single."""
    device: str = "auto"
    """auto (cuda, then mps, then cpu), or a torch device string such as `cpu` or `cuda:1`."""
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)


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
    match = difflib.get_close_matches(key, keys, n=1, cutoff=0.6)
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


# words YAML 1.1 turns into booleans; a boolean key still accepts them as strings ("on" -> True)
_YAML_BOOLEAN_WORDS = {"on", "off", "yes", "no", "y", "n"}


# keys whose automatic choice is None in the dataclasses, also written `auto` on the command line
_AUTO_MEANS_NONE = ("train.epochs", "train.batch_size", "data.horizontal_flip", "model.width", "model.blocks",
                    "loss.label_smoothing")


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
        key, _, value = override.partition("=")
        if key in _AUTO_MEANS_NONE and value == "auto":
            override = f"{key}=null"
        if value.lower() in _YAML_BOOLEAN_WORDS:  # YAML 1.1 reads `off` as False: `data.cache=off` means the word
            override = f'{key}="{value}"'
        try:
            dotlist = OmegaConf.from_dotlist([override])
        except OmegaConfBaseException as error:
            raise ImgclsError(f"cannot parse override '{override}': {str(error).splitlines()[0]}") from error
        merged = _merge(merged, dotlist, f"override '{override}'", override.split("=", 1)[0])
    config: Config = OmegaConf.to_object(merged)
    _check_ranges(config)
    return config


def run_name_problem(name: str) -> str | None:
    """Why `name` cannot be a run folder's name, or None. A run name is one folder name inside
    `run.dir`: `../x`, `.`, `..` or an absolute path would put the run, and what `--force` deletes,
    somewhere else."""
    if not name or name in (".", ".."):
        return "is not a folder name; give a name such as run.name=baseline"
    if "/" in name or "\\" in name or Path(name).is_absolute():
        return "must be one folder name inside run.dir, not a path; to put runs elsewhere, set run.dir"
    return None


def _check_ranges(config: Config) -> None:
    """Values that have the right type but make no sense."""
    if config.data.image_size is not None:
        from imgcls.data.images import check_image_size  # here: importing imgcls.data imports torch

        check_image_size(config.data.image_size)
    if config.run.name is not None and run_name_problem(config.run.name):
        raise ImgclsError(f"bad value for 'run.name': '{config.run.name}' {run_name_problem(config.run.name)}")
    checks = [
        ("train.epochs", config.train.epochs is None or config.train.epochs >= 1, "must be at least 1 (or auto)"),
        ("train.batch_size", config.train.batch_size is None or config.train.batch_size >= 1, "must be at least 1 (or auto)"),
        ("optim.lr", 0 < config.optim.lr < math.inf, "must be a positive number"),
        ("data.val_fraction", 0 < config.data.val_fraction < 1, "must be between 0 and 1"),
        ("data.test_fraction", 0 <= config.data.test_fraction < 1, "must be between 0 and 1"),
        ("loss.label_smoothing", config.loss.label_smoothing is None or 0 <= config.loss.label_smoothing < 1,
         "must be in [0, 1) (or auto)"),
        ("data.image_size", config.data.image_size is None or config.data.image_size >= 8, "must be at least 8"),
        ("data.color_jitter", config.data.color_jitter is None or 0 <= config.data.color_jitter <= 1, "must be in [0, 1]"),
        ("data.random_erasing", 0 <= config.data.random_erasing <= 1, "must be in [0, 1]"),
        ("data.mixup_alpha", config.data.mixup_alpha >= 0, "must be 0 or more"),
        ("data.cutmix_alpha", config.data.cutmix_alpha >= 0, "must be 0 or more"),
        ("data.mix_probability", 0 <= config.data.mix_probability <= 1, "must be in [0, 1]"),
        ("train.patience", config.train.patience is None or config.train.patience >= 1, "must be at least 1"),
        ("train.accumulate", config.train.accumulate >= 1, "must be at least 1"),
        ("train.ema_decay", 0 < config.train.ema_decay < 1, "must be between 0 and 1"),
        ("train.max_minutes", config.train.max_minutes is None or config.train.max_minutes > 0, "must be positive"),
        ("data.fraction", 0 < config.data.fraction <= 1, "must be in (0, 1]"),
        ("data.per_class_limit", config.data.per_class_limit is None or config.data.per_class_limit >= 1,
         "must be at least 1"),
        ("model.freeze_epochs", config.model.freeze_epochs >= 0, "must be 0 or more"),
        ("train.reject_precision", 0 < config.train.reject_precision < 1, "must be between 0 and 1"),
        ("model.width", config.model.width is None or config.model.width >= 4, "must be at least 4 (or auto)"),
        ("model.blocks", config.model.blocks is None or config.model.blocks >= 1, "must be at least 1 (or auto)"),
        ("model.head_hidden", config.model.head_hidden is None or config.model.head_hidden >= 1, "must be at least 1"),
        ("optim.backbone_lr_ratio", config.optim.backbone_lr_ratio >= 0, "must be 0 or more"),
        ("loss.focal_gamma", config.loss.focal_gamma >= 0, "must be 0 or more"),
        ("loss.asl_clip", 0 <= config.loss.asl_clip < 1, "must be in [0, 1)"),
        ("data.label_separator", len(config.data.label_separator) >= 1 and config.data.label_separator != ",",
         "must be one or more characters other than the CSV's comma"),
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
    from imgcls.checkpoint import atomic_write  # here: it imports torch, which loading a config does not need

    atomic_write(path, OmegaConf.to_yaml(OmegaConf.structured(config)).encode())  # never half a config
