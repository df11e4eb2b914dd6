"""The settings of a classification training run: one validated model (pydantic) for the API, the
command line (its flags are generated from it, :mod:`parnet.cli.train`), YAML files and the copy
kept in each checkpoint.

Types, ranges and choices are declared once, on the fields of :class:`TrainConfig`; a wrong value
is a ``ValueError`` naming the file (or "arguments"), the key and what is allowed. Settings come
from, in increasing priority: the defaults, the dataset's (``DATASET_DEFAULTS``;
``configs/<dataset>.yaml`` writes them out, ``imagenet.yaml`` for ``imagefolder``), with ``resume``
the run's own (from its checkpoint), a YAML file (``--config``), the command line: :func:`make_config`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

__all__ = [
    "DATASET_DEFAULTS", "RESERVED_MODEL_KWARGS", "TrainConfig", "check_config", "default_img_size", "make_config",
    "read_yaml",
]  # fmt: skip

# model_kwargs keys the run sets itself, and why (checked on the command line and in files).
RESERVED_MODEL_KWARGS = {
    "in_chans": "set by the dataset's images",
    "num_classes": "set by the dataset",
    "drop_rate": "use --drop-rate",
    "drop_path_rate": "use --drop-path-rate",
}


# Which N images --train-subset / --test-subset take (build_datasets): said alike in every help text.
SUBSET_RULE = "the first N of Fashion-MNIST and CIFAR, N spread over an image folder's classes"


class Settings(BaseModel):
    """Validated settings: unknown keys, NaN/inf and wrong types refused; values checked again when set."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, validate_assignment=True)


def _on_off(value: Any) -> Any:
    """YAML reads a bare on/off as a boolean; the choice fields take the words."""
    return ("on" if value else "off") if isinstance(value, bool) else value


class TrainConfig(Settings):
    """Every knob of a training run (``parnet train --help`` shows the same with their defaults)."""

    dataset: str = Field("fashion_mnist", description="fashion_mnist, cifar10, cifar100 or imagefolder")
    data_dir: str | None = Field(None, description="where the dataset is (default: the dataset's usual place)")
    download: bool = Field(False, description="CIFAR: fetch it with torchvision if missing (needs internet)")
    model: str = Field("parnet_cifar_s", description="any timm model name (ParNet variants, resnet20_cifar, ...)")
    model_kwargs: dict[str, Any] = Field(
        default_factory=dict,
        description="architecture keywords of timm.create_model, those a run's weights files rebuild the model "
        "with: ParNet's (widths, head_width, blocks, act, use_gate, small_input, stem_width) and the baselines' "
        "(depth_per_stage, channels)",
    )
    initial_checkpoint: str | None = Field(
        None,
        description="start from these weights (fine-tuning): a run folder, a .safetensors file of ours, an "
        "authors' .pth.tar, or timm's own weights file of --model (model.safetensors, pytorch_model.bin: an "
        "offline copy of --pretrained's); the classifier restarts for a new class count, the input convolutions "
        "adapt to the channels",
    )
    pretrained: bool = Field(
        False,
        description="start from --model's released weights (timm's pretrained=True, downloaded by timm; the tag "
        "picks which, e.g. resnet10t.c3_in1k); classifier and input convolutions adapted as for "
        "--initial-checkpoint",
    )
    img_size: int = Field(
        0,
        ge=0,
        le=4096,
        description="image side the model trains and is tested at, pixels (0 = 32 for Fashion-MNIST and CIFAR, "
        "the model's default input size for an image folder)",
    )
    epochs: int = Field(30, ge=1, description="training epochs")
    batch_size: int = Field(128, ge=1, description="images per step per process")
    lr: float = Field(
        0.1, gt=0, description="peak learning rate (after warm-up), for the global batch (--batch-size x processes)"
    )
    lr_base_size: int | None = Field(
        None,
        ge=1,
        description="with it, --lr is the rate for a global batch of this many images, scaled linearly to the run's "
        "(--batch-size x processes), as timm's --lr-base-size: a recipe keeps its rate on any number of processes; "
        "none: --lr as given",
    )
    opt: str = Field(
        "momentum",
        description="timm optimizer: momentum = SGD with momentum (the paper), sgd = Nesterov, adamw...",
    )
    momentum: float = Field(0.9, ge=0, description="SGD momentum")
    weight_decay: float = Field(5e-4, ge=0, description="L2 weight decay (not applied to biases and norms)")
    layer_decay: float | None = Field(
        None,
        gt=0,
        le=1,
        description="layer-wise learning-rate decay (timm's --layer-decay): each group of layers, from the "
        "classifier back, trains at this factor of the next one's rate (ParNet: its group_matcher, one group per "
        "layer of depth, parallel streams' blocks at the same depth together); none: one rate",
    )
    # Schedules stepped per update (timm's "plateau" steps per epoch only, on a metric: not offered).
    sched: Literal["cosine", "step", "multistep", "poly", "tanh", "wsd"] = Field(
        "cosine", description="timm scheduler name"
    )
    warmup_epochs: float = Field(
        2, ge=0, description="linear warm-up from warmup_lr to lr, in epochs (fractional allowed; below --epochs)"
    )
    warmup_lr: float = Field(1e-4, ge=0, description="learning rate at the start of warm-up (at most lr)")
    warmup_prefix: bool = Field(
        False,
        description="the schedule starts after the warm-up (timm's --warmup-prefix); off: it runs from step 0 "
        "and the warm-up overrides its start, so the rate falls to the schedule's value when warm-up ends",
    )
    min_lr: float = Field(0.0, ge=0, description="learning rate at the end of the schedule (at most lr)")
    decay_epochs: float | None = Field(
        None,
        gt=0,
        description="step: epochs between decays by decay_rate; wsd: length of the final decay, epochs or a "
        "fraction < 1 of the run (default: a third of --epochs for step, 0.2 for wsd)",
    )
    decay_milestones: list[float] | None = Field(
        None, description="multistep: epochs at which the rate decays by decay_rate (default: half and "
        "three quarters of --epochs), e.g. 10,20",
    )  # fmt: skip
    decay_rate: float = Field(0.1, gt=0, le=1, description="step and multistep: factor of each decay")
    label_smoothing: float = Field(0.1, ge=0, le=1, description="label smoothing of the cross-entropy")
    auto_augment: str = Field(
        "rand-m9-mstd0.5",
        description='timm auto-augment spec: rand-... (RandAugment), augmix-..., or an AutoAugment policy ("" = none)',
    )
    re_prob: float = Field(0.25, ge=0, le=1, description="random erasing probability")
    hflip: float = Field(0.5, ge=0, le=1, description="horizontal flip probability")
    mixup: float = Field(0.0, ge=0, description="Mixup alpha (0 = off)")
    cutmix: float = Field(0.0, ge=0, description="CutMix alpha (0 = off)")
    drop_rate: float = Field(0.0, ge=0, le=1, description="dropout before the classifier")
    drop_path_rate: float = Field(
        0.0, ge=0, lt=1, description="stochastic depth (timm's drop_path_rate; a ParNet's on its stream blocks)"
    )
    grad_clip: float = Field(0.0, ge=0, description="clip the gradient norm to this (0 = off)")
    ema: bool = Field(True, description="keep an EMA of the weights (timm ModelEmaV3, with warm-up)")
    ema_decay: float = Field(0.999, gt=0, lt=1, description="EMA decay per step")
    amp: Literal["auto", "bf16", "fp16", "off"] = Field(
        "auto",
        description="autocast: bf16, fp16, off, or auto (bf16 on CUDA; on a CPU with native bf16, bf16 where a timed "
        "training step is faster; else off)",
    )
    channels_last: Literal["auto", "on", "off"] = Field("auto", description="on, off, or auto (on with CUDA)")
    compile: bool = Field(False, description="torch.compile the model")
    workers: int = Field(2, ge=0, le=256, description="data loader worker processes")
    seed: int = Field(0, ge=0, description="seed of everything (each rank adds its rank)")
    device: Literal["cpu", "cuda"] | None = Field(None, description="cpu or cuda (default: cuda when available)")
    output: str = Field("", description="run folder (default runs/<dataset>-<model>)")
    resume: bool = Field(
        False, description="continue the run in `output` from its last checkpoint, with the settings saved in it"
    )
    stop_after: int = Field(
        0, ge=0, description="end after this many epochs of this invocation (time-limited jobs); 0 = no limit"
    )
    train_subset: int = Field(
        0,
        ge=0,
        description=f"use only N training images (0 = all): {SUBSET_RULE}",
    )
    test_subset: int = Field(
        0,
        ge=0,
        description=f"use only N test images (0 = all): {SUBSET_RULE}",
    )
    eval_batch_size: int = Field(0, ge=0, description="evaluation batch size (0 = batch_size)")
    progress: bool = Field(True, description="show a progress bar")
    threads: int = Field(
        0, ge=0, le=1024, description="torch CPU threads per process (0 = torch's default; 1 is fastest on a busy CPU)"
    )
    depth: bool = Field(True, description="measure the network depth at the end (torch.export; takes a few seconds)")

    @field_validator("dataset")
    @classmethod
    def _known_dataset(cls, value: str) -> str:
        from .data import DATASETS

        if value not in DATASETS:
            raise ValueError(f"unknown dataset {value!r}; choose one of {', '.join(DATASETS)}")
        return value

    @field_validator("auto_augment")
    @classmethod
    def _auto_augment(cls, value: str) -> str:
        from .data import auto_augment_transform

        if value:
            auto_augment_transform(value)  # a ValueError that shows an example of each kind
        return value

    @field_validator("img_size")
    @classmethod
    def _image_size(cls, value: int) -> int:
        from .data import MIN_IMG_SIZE

        if 0 < value < MIN_IMG_SIZE:
            raise ValueError(f"must be 0 (the default size) or at least {MIN_IMG_SIZE} pixels, got {value}")
        return value

    @field_validator("model")
    @classmethod
    def _known_model(cls, value: str) -> str:
        from .factory import check_model_name

        return check_model_name(value)

    @field_validator("opt")
    @classmethod
    def _known_optimizer(cls, value: str) -> str:
        from timm.optim import list_optimizers

        if value.lower() not in list_optimizers():
            raise ValueError(
                f"unknown timm optimizer {value!r}; e.g. momentum, sgd, adamw (see timm.optim.list_optimizers)"
            )
        return value

    @field_validator("model_kwargs", mode="before")
    @classmethod
    def _architecture_only(cls, value: Any) -> Any:
        """Architecture keywords only: the weights files a run writes must be read back with them."""
        from .weights import setting_kwargs

        return setting_kwargs(value, RESERVED_MODEL_KWARGS)

    @field_validator("decay_milestones", mode="before")
    @classmethod
    def _milestones(cls, value: Any) -> Any:
        """``10,20`` from the command line, a list from a file; increasing epochs."""
        if isinstance(value, str):
            try:
                value = [float(v) for v in value.replace(" ", "").strip("[]()").split(",") if v]
            except ValueError:
                raise ValueError(f"must be epochs separated by commas, e.g. 10,20, got {value!r}") from None
        if isinstance(value, list) and (not value or any(b <= a for a, b in zip(value, value[1:]))):
            raise ValueError(f"must be one or more increasing epochs, got {value!r}")
        return value

    @field_validator("amp", "channels_last", mode="before")
    @classmethod
    def _words(cls, value: Any) -> Any:
        return _on_off(value)

    def run_dir(self) -> Path:
        return Path(self.output or f"runs/{self.dataset}-{self.model}")


# Defaults per dataset, applied over TrainConfig's and under a YAML file and the command line. This is
# the one source of them: configs/<dataset>.yaml (imagenet.yaml for imagefolder) only writes them out (a
# test holds the two equal), because configs/ is not part of the installed package.
# The model is parnet_cifar_s on every small-image dataset: the paper reports S, M and L on both
# CIFARs alike, so the dataset alone is no reason for a 12x bigger network (--model parnet_cifar_m).
# The EMA decay follows the run's length in steps, as timm's 0.9998 does for ImageNet: its horizon
# 1 / (1 - decay) should be a few epochs. Fashion-MNIST's 30 x 468 steps take 0.999 (about 2
# epochs), CIFAR's 200 x 390 steps 0.9995 (about 5 of 200), ImageNet's 120 x 5000 steps 0.9998.
DATASET_DEFAULTS: dict[str, dict[str, Any]] = {
    "fashion_mnist": dict(
        model="parnet_cifar_s", epochs=30, batch_size=128, lr=0.1, weight_decay=5e-4, warmup_epochs=2
    ),
    "cifar10": dict(
        model="parnet_cifar_s", epochs=200, batch_size=128, lr=0.1, weight_decay=5e-4, warmup_epochs=5, ema_decay=0.9995
    ),
    "cifar100": dict(
        model="parnet_cifar_s", epochs=200, batch_size=128, lr=0.1, weight_decay=5e-4, warmup_epochs=5, ema_decay=0.9995
    ),
    # The paper's ImageNet recipe (lr 0.8 at batch 2048, 120 epochs, wd 5e-5), scaled to batch 256; 224 px
    # JPEGs with RandAugment need more loader workers (never more than the CPUs: see loaders.build_loaders).
    "imagefolder": dict(
        model="parnet_s",
        epochs=120,
        batch_size=256,
        lr=0.1,
        weight_decay=5e-5,
        warmup_epochs=5,
        ema_decay=0.9998,
        workers=8,
    ),
}


def validation_message(error: ValidationError, source: str) -> str:
    """One line per wrong value of a pydantic ``error``: ``source: key: what is wrong (got value)``."""
    lines = []
    for e in error.errors():
        key = ".".join(str(part) for part in e["loc"]) or "settings"
        message = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            message = "unknown setting"
        got = "" if e["type"] in ("extra_forbidden", "value_error") else f" (got {e['input']!r})"
        lines.append(f"{source}: {key}: {message}{got}" if key != "settings" else f"{source}: {message}")
    return "; ".join(lines)


def _check_plain_type(value: Any, annotation: Any, source: str, key: str) -> None:
    """Refuse what pydantic's lax mode would turn silently into another type: a boolean as a number (YAML reads
    ``true``, ``yes`` and ``on`` as booleans, pydantic ``true`` as 1), a word as a boolean."""
    import typing

    allowed = set(typing.get_args(annotation)) or {annotation}
    if isinstance(value, bool) and bool not in allowed and allowed & {int, float}:
        raise ValueError(f"{source}: {key}: needs a number, got {value!r}")
    if allowed == {bool} and not isinstance(value, bool):
        raise ValueError(f"{source}: {key}: needs true or false, got {value!r}")


def check_config(values: dict[str, Any], source: str = "config", model: type[Settings] = TrainConfig) -> dict[str, Any]:
    """Parse and check ``values`` (field -> value, ``-`` or ``_`` in names) with ``model``'s rules.

    Returns the checked values of the keys given; ``ValueError`` naming ``source``, the key and what is allowed.
    """
    values = {str(k).replace("-", "_"): v for k, v in values.items()}
    fields = model.model_fields
    checked = model.model_construct()  # each value validated as if assigned to it: one field at a time
    for key, value in values.items():
        if key not in fields:
            raise ValueError(f"{source}: unknown setting {key!r}; the settings are: {', '.join(fields)}")
        field = fields[key]
        _check_plain_type(value, field.annotation, source, key)
        if value is None and field.default is not None:  # only the settings whose default is none may be empty
            example = field.get_default(call_default_factory=True)
            raise ValueError(f"{source}: {key}: needs a value (e.g. {example!r}), got none")
        try:
            model.__pydantic_validator__.validate_assignment(checked, key, value)
        except ValidationError as e:
            raise ValueError(validation_message(e, source)) from None
    return {k: getattr(checked, k) for k in values}


# Settings of one invocation, not of the run: a resumed run does not take them from its saved settings.
PER_INVOCATION = ("output", "resume", "stop_after")  # never taken from a run's saved settings on resume


def read_yaml(path: Path, model: type[Settings] = TrainConfig) -> dict[str, Any]:
    """The checked settings of a YAML file; ``ValueError`` naming the file (and the line of a syntax error)."""
    import yaml

    class UniqueKeyLoader(yaml.SafeLoader):
        """YAML's safe loader, refusing a key given twice (PyYAML keeps the last, silently)."""

        def construct_mapping(self, node: Any, deep: bool = False) -> dict[Any, Any]:
            seen = set()
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=deep)
                if key in seen:
                    raise yaml.constructor.ConstructorError(None, None, f"{key!r} is given twice", key_node.start_mark)
                seen.add(key)
            return super().construct_mapping(node, deep)

    try:
        loaded = yaml.load(path.read_text(), UniqueKeyLoader) or {}  # noqa: S506 - a safe loader
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)  # one line: the problem and where, not the parser's excerpt
        at = f" (line {where.line + 1}, column {where.column + 1})" if where is not None else ""
        raise ValueError(f"{path} is not valid YAML: {getattr(e, 'problem', None) or e}{at}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read {path}: {e}") from None
    if not isinstance(loaded, dict):
        raise ValueError(f"{path} must hold a mapping of settings, got {type(loaded).__name__}")
    return check_config(loaded, str(path), model)


def _run_settings(run_dir: Path) -> dict[str, Any] | None:
    """The checked settings of the run in ``run_dir``: its checkpoint's, else its config.yaml's, else ``None``."""
    from .checkpoint import CONFIG_FILE, STATE_FILE, read_state

    if (run_dir / STATE_FILE).is_file():
        saved = read_state(run_dir)["extra"].get("config")
        if not isinstance(saved, dict):
            raise ValueError(f"{run_dir / STATE_FILE} holds no settings: it was not written by `parnet train`")
        return check_config(saved, f"the settings in {run_dir / STATE_FILE}")
    if (run_dir / CONFIG_FILE).is_file():
        return read_yaml(run_dir / CONFIG_FILE)
    return None


def _dataset_img_size(settings: dict[str, Any]) -> int:
    """The size a run trained at before ``img_size`` was a setting: its dataset's own (224 for folders)."""
    from .data import DATASETS

    return DATASETS[settings.get("dataset", TrainConfig.model_fields["dataset"].default)].img_size


def default_img_size(dataset: str, model: str) -> int:
    """``img_size`` 0's meaning: 32 for the small datasets; for an image folder the model's default
    input size (timm's pretrained config: 32 for the small-input ParNets, 224 for ParNet-S), else 224."""
    from .data import DATASETS
    from .factory import default_input_size

    if dataset != "imagefolder":
        return DATASETS[dataset].img_size
    return default_input_size(model) or DATASETS[dataset].img_size


def _default_data_dir(dataset: str) -> str:
    from .data import DATASETS

    return DATASETS[dataset].default_dir


def _with_dataset_defaults(settings: dict[str, Any]) -> TrainConfig:
    dataset = settings.get("dataset", TrainConfig.model_fields["dataset"].default)
    return TrainConfig(**{**DATASET_DEFAULTS.get(dataset, {}), **settings})


def _layered(lower: dict[str, Any], upper: dict[str, Any]) -> dict[str, Any]:
    """``upper``'s settings over ``lower``'s; ``model_kwargs`` merged key by key, so that a flag
    changing one architecture keyword keeps the file's others."""
    merged = {**lower, **upper}
    if isinstance(lower.get("model_kwargs"), dict) and isinstance(upper.get("model_kwargs"), dict):
        merged["model_kwargs"] = {**lower["model_kwargs"], **upper["model_kwargs"]}
    return merged


def _check_schedule(cfg: TrainConfig) -> None:
    """Refuse a learning-rate schedule that would not anneal: a warm-up filling the run, rates above the peak,
    decays after the last epoch."""
    if cfg.warmup_epochs >= cfg.epochs:
        raise ValueError(
            f"--warmup-epochs {cfg.warmup_epochs:g} is not shorter than --epochs {cfg.epochs}: the rate would never "
            f"decay from its warm-up; give --warmup-epochs below {cfg.epochs} (e.g. {cfg.epochs / 10:g})"
        )
    for name in ("warmup_lr", "min_lr"):  # (a rate scaled by --lr-base-size is checked once the processes are known)
        if getattr(cfg, name) > cfg.lr:
            raise ValueError(f"--{name.replace('_', '-')} {getattr(cfg, name):g} is above the peak --lr {cfg.lr:g}")
    late = [m for m in cfg.decay_milestones or () if m >= cfg.epochs]
    if cfg.sched == "multistep" and late:
        raise ValueError(f"--decay-milestones {late} fall after the run's {cfg.epochs} epochs: they would never act")
    if cfg.sched == "step" and cfg.decay_epochs is not None and cfg.decay_epochs >= cfg.epochs:
        raise ValueError(f"--decay-epochs {cfg.decay_epochs:g} is not shorter than --epochs {cfg.epochs}: no decay")


def peak_lr(cfg: TrainConfig, world_size: int) -> float:
    """The run's peak learning rate: ``--lr``, scaled to the global batch where ``--lr-base-size`` is given;
    ``ValueError`` where the scaled rate falls below ``--warmup-lr`` or ``--min-lr``."""
    if cfg.lr_base_size is None:
        return cfg.lr
    global_batch = cfg.batch_size * world_size
    lr = cfg.lr * global_batch / cfg.lr_base_size
    for name in ("warmup_lr", "min_lr"):
        if getattr(cfg, name) > lr:
            raise ValueError(
                f"--lr {cfg.lr:g} for {cfg.lr_base_size} images is {lr:g} for this run's {global_batch}, below "
                f"--{name.replace('_', '-')} {getattr(cfg, name):g}: lower it"
            )
    return lr


def make_config(overrides: dict[str, Any] | None = None, config_file: str | None = None) -> TrainConfig:
    """A checked :class:`TrainConfig`: defaults, then the dataset's, then ``config_file`` (YAML), then ``overrides``.

    With ``resume``, the run's own settings come under ``config_file``: those in its checkpoint (the
    authority, whatever ``config.yaml`` says), or, killed before its first checkpoint, its
    ``config.yaml``. A resumed run keeps its settings unless told otherwise, and ``train`` refuses a
    changed one that the restored state depends on.
    """
    overrides = check_config(overrides or {}, "arguments")
    from_file: dict[str, Any] = {}
    if config_file:
        path = Path(config_file)
        if path.is_dir():
            raise ValueError(f"config file {path} is a folder: give the YAML file")
        if not path.is_file():
            raise FileNotFoundError(f"config file {path} does not exist")
        from_file = read_yaml(path)
        if once := [f"{k}: {from_file[k]}" for k in ("resume", "stop_after") if from_file.get(k)]:
            import warnings

            warnings.warn(
                f"{path} sets {', '.join(once)}, a setting of one invocation, not of a run (the config.yaml of a "
                "run from an earlier version): left out; give --resume / --stop-after as flags",
                stacklevel=2,
            )
        from_file = {k: v for k, v in from_file.items() if k not in ("resume", "stop_after")}
    given = _layered(from_file, overrides)
    try:
        cfg = _with_dataset_defaults(given)
        if cfg.resume and (saved := _run_settings(cfg.run_dir())):
            saved = {k: v for k, v in saved.items() if k not in PER_INVOCATION}
            saved.setdefault("img_size", _dataset_img_size(saved))  # saved before the setting existed
            cfg = _with_dataset_defaults({**_layered(saved, given), "output": str(cfg.run_dir())})
        if cfg.img_size == 0:  # resolved once, so the run's files say the size it trained at
            cfg.img_size = default_img_size(cfg.dataset, cfg.model)
        # An absolute path, so that the run's files name its data wherever they are used from (eval, --resume).
        cfg.data_dir = str(Path(cfg.data_dir or _default_data_dir(cfg.dataset)).expanduser().absolute())
    except ValidationError as e:
        raise ValueError(validation_message(e, config_file or "arguments")) from None
    if not (cfg.resume and saved):  # a resumed run keeps the schedule it started with
        if "warmup_epochs" not in given and cfg.warmup_epochs >= cfg.epochs:  # the dataset's, for a longer run
            cfg.warmup_epochs = cfg.epochs / 10
        _check_schedule(cfg)
    if cfg.pretrained and cfg.initial_checkpoint:
        raise ValueError(
            "give --pretrained (timm's download of the released weights) or --initial-checkpoint (a file, also an "
            "offline copy of them), not both"
        )
    # Valid one by one, not together: smoothing 1 leaves no target unless Mixup/CutMix soften the labels.
    if cfg.mixup == 0 and cfg.cutmix == 0 and cfg.label_smoothing >= 1:
        raise ValueError("label_smoothing must be below 1 (without --mixup or --cutmix)")
    if (cfg.mixup > 0 or cfg.cutmix > 0) and cfg.batch_size % 2:  # timm's Mixup mixes each batch with its reverse
        raise ValueError(f"--mixup and --cutmix need an even --batch-size, got {cfg.batch_size}")
    return cfg
