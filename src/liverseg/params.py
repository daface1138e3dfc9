"""Typed, frozen view of ``params.yaml``: one dataclass per stage section.

Stages read their section once with :func:`load_section`; library code receives the
dataclass and never reads the YAML itself. Unknown keys, missing keys and out-of-range values
raise :class:`ParamsError` naming the dotted key (e.g. ``train.model.depth``).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from liverseg.errors import ParamsError

T = TypeVar("T")


def _require(ok: bool, key: str, msg: str) -> None:
    if not ok:
        raise ParamsError(f"params: {key}: {msg}")


# --------------------------------------------------------------------------------------- ingest
@dataclass(frozen=True)
class PhantomParams:
    n_cases: int = 12
    size: int = 128
    n_slices: int = 48
    spacing: tuple[float, float, float] = (2.5, 2.5, 4.0)
    seed: int = 0

    def __post_init__(self) -> None:
        _require(self.n_cases >= 2, "ingest.phantom.n_cases", "must be >= 2")
        _require(16 <= self.size <= 1024, "ingest.phantom.size", "must be in [16, 1024]")
        _require(8 <= self.n_slices <= 1024, "ingest.phantom.n_slices", "must be in [8, 1024]")
        _require(
            len(self.spacing) == 3 and all(s > 0 for s in self.spacing),
            "ingest.phantom.spacing",
            "must be three positive numbers (mm)",
        )


@dataclass(frozen=True)
class SynthParams:
    """``ingest.synth``: synthetic CT from the label maps (liverseg.data.synth)."""

    pixel_mm: tuple[float, float] = (0.5, 1.0)
    thickness_mm: tuple[float, float] = (1.0, 5.0)
    matrix: int = 256
    cut_prob: float = 0.5
    seed: int = 0

    def __post_init__(self) -> None:
        for key, lo_hi in (("pixel_mm", self.pixel_mm), ("thickness_mm", self.thickness_mm)):
            _require(
                len(lo_hi) == 2 and 0 < lo_hi[0] <= lo_hi[1],
                f"ingest.synth.{key}",
                "must be [low, high] with 0 < low <= high (mm)",
            )
        _require(64 <= self.matrix <= 1024, "ingest.synth.matrix", "must be in [64, 1024]")
        _require(0.0 <= self.cut_prob <= 1.0, "ingest.synth.cut_prob", "must be in [0, 1]")


@dataclass(frozen=True)
class IrcadParams:
    source: str = ""
    sha256: str = ""
    format: str = "nifti-zip"
    max_unpacked_gb: float = 20.0

    def __post_init__(self) -> None:
        fmts = ("nifti-zip", "dicom-zip", "nifti-dir", "dicom-dir")
        _require(self.format in fmts, "ingest.ircad.format", f"must be one of {fmts}")
        _require(
            self.sha256 == "" or (len(self.sha256) == 64 and _is_hex(self.sha256)),
            "ingest.ircad.sha256",
            "must be empty or 64 hex digits",
        )
        _require(self.max_unpacked_gb > 0, "ingest.ircad.max_unpacked_gb", "must be > 0")


def _require_processes(value: object, key: str) -> None:
    """``auto`` or a positive integer (how many worker processes train at once)."""
    ok = value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and value >= 1)
    _require(ok, key, f"must be auto or an integer >= 1, got {value!r}")


def _is_hex(s: str) -> bool:
    try:
        int(s, 16)
    except ValueError:
        return False
    return True


@dataclass(frozen=True)
class IngestParams:
    dataset: str = "synth"
    synth: SynthParams = field(default_factory=SynthParams)
    phantom: PhantomParams = field(default_factory=PhantomParams)
    ircad: IrcadParams = field(default_factory=IrcadParams)

    def __post_init__(self) -> None:
        datasets = ("synth", "phantom", "ircad")
        _require(self.dataset in datasets, "ingest.dataset", f"must be one of {datasets}")
        if self.dataset == "ircad":
            _require(bool(self.ircad.source), "ingest.ircad.source", "must be set for ircad")


# -------------------------------------------------------------------------------------- prepare
@dataclass(frozen=True)
class PrepareParams:
    window: tuple[float, float] = (-100.0, 400.0)
    image_size: int = 96
    liver_free_fraction: float = 0.15
    n_test: int = 3
    test_cases: tuple[str, ...] = ()
    k_folds: int = 3
    seed: int = 42

    def __post_init__(self) -> None:
        _require(
            len(self.window) == 2 and self.window[0] < self.window[1],
            "prepare.window",
            "must be [low, high] with low < high (HU)",
        )
        _require(16 <= self.image_size <= 1024, "prepare.image_size", "must be in [16, 1024]")
        _require(self.image_size % 16 == 0, "prepare.image_size", "must be a multiple of 16")
        _require(
            0.0 <= self.liver_free_fraction <= 1.0,
            "prepare.liver_free_fraction",
            "must be in [0, 1]",
        )
        _require(self.n_test >= 1, "prepare.n_test", "must be >= 1")
        _require(
            len(self.test_cases) <= self.n_test,
            "prepare.test_cases",
            "must not name more cases than prepare.n_test",
        )
        _require(
            len(set(self.test_cases)) == len(self.test_cases),
            "prepare.test_cases",
            "names a case twice",
        )
        _require(self.k_folds >= 2, "prepare.k_folds", "must be >= 2")


# ----------------------------------------------------------------------------------------- tune
@dataclass(frozen=True)
class TuneParams:
    n_trials: int = 4
    timeout_s: float = 3600.0
    epochs: int = 4
    folds: tuple[int, ...] = (0,)
    lr_min: float = 1e-3
    lr_max: float = 1e-2
    batch_sizes: tuple[int, ...] = (4, 8, 16)
    pruner_warmup_epochs: int = 1
    generation_size: int = 1
    processes: str | int = 1
    seed: int = 42
    storage: str = "sqlite:///optuna/optuna.db"

    def __post_init__(self) -> None:
        _require(self.n_trials >= 1, "tune.n_trials", "must be >= 1")
        _require(self.timeout_s > 0, "tune.timeout_s", "must be > 0")
        _require(self.epochs >= 1, "tune.epochs", "must be >= 1")
        _require(len(self.folds) >= 1, "tune.folds", "must list at least one fold")
        _require(all(f >= 0 for f in self.folds), "tune.folds", "fold indices must be >= 0")
        _require(0 < self.lr_min < self.lr_max, "tune.lr_min", "need 0 < lr_min < lr_max")
        _require(
            len(self.batch_sizes) >= 1 and all(b >= 1 for b in self.batch_sizes),
            "tune.batch_sizes",
            "must list positive batch sizes",
        )
        _require(self.pruner_warmup_epochs >= 0, "tune.pruner_warmup_epochs", "must be >= 0")
        _require(self.generation_size >= 1, "tune.generation_size", "must be >= 1")
        _require_processes(self.processes, "tune.processes")
        _require(bool(self.storage), "tune.storage", "must be a storage URL")


# ---------------------------------------------------------------------------------------- train
@dataclass(frozen=True)
class ModelParams:
    depth: int = 4
    base_filters: int = 16
    dropout: float = 0.1
    batch_norm: bool = True

    def __post_init__(self) -> None:
        _require(1 <= self.depth <= 6, "train.model.depth", "must be in [1, 6]")
        _require(self.base_filters >= 1, "train.model.base_filters", "must be >= 1")
        _require(0.0 <= self.dropout < 1.0, "train.model.dropout", "must be in [0, 1)")


@dataclass(frozen=True)
class AugmentParams:
    flip: bool = False
    rotate_deg: float = 10.0
    scale: float = 0.1
    intensity: float = 0.05
    blur_prob: float = 0.2

    def __post_init__(self) -> None:
        _require(0 <= self.rotate_deg <= 180, "train.augment.rotate_deg", "must be in [0, 180]")
        _require(0 <= self.scale < 1, "train.augment.scale", "must be in [0, 1)")
        _require(0 <= self.intensity < 1, "train.augment.intensity", "must be in [0, 1)")
        _require(0 <= self.blur_prob <= 1, "train.augment.blur_prob", "must be in [0, 1]")


@dataclass(frozen=True)
class ModelSpec:
    """What defines the network that :func:`liverseg.training.fit.fit` trains: architecture,
    loss, augmentation and precision (the train section's fields that ``tune`` hashes into its
    study's name and lists as ``params`` in ``dvc.yaml``). Built by :attr:`TrainParams.spec`."""

    model: ModelParams = field(default_factory=ModelParams)
    loss: str = "dice_bce"
    augment: AugmentParams = field(default_factory=AugmentParams)
    precision: str = "float32"


@dataclass(frozen=True)
class TrainParams:
    model: ModelParams = field(default_factory=ModelParams)
    loss: str = "dice_bce"
    learning_rate: float = 2e-3
    batch_size: int = 16
    use_tuned: bool = True
    epochs: int = 14
    patience: int = 4
    val_stride: int = 1
    final: str = "ensemble"
    precision: str = "float32"
    distribute: str = "none"
    processes: str | int = 1
    augment: AugmentParams = field(default_factory=AugmentParams)
    seed: int = 42
    experiment: str = "liverseg"

    def __post_init__(self) -> None:
        _require(self.loss in ("dice_bce", "dice"), "train.loss", "must be dice_bce or dice")
        _require(self.learning_rate > 0, "train.learning_rate", "must be > 0")
        _require(self.batch_size >= 1, "train.batch_size", "must be >= 1")
        _require(self.epochs >= 1, "train.epochs", "must be >= 1")
        _require(self.patience >= 1, "train.patience", "must be >= 1")
        _require(self.val_stride >= 1, "train.val_stride", "must be >= 1")
        _require(self.final in ("retrain", "ensemble"), "train.final", "must be retrain|ensemble")
        _require(
            self.precision in ("float32", "mixed_bfloat16"),
            "train.precision",
            "must be float32 or mixed_bfloat16",
        )
        _require(
            self.distribute in ("none", "mirrored"), "train.distribute", "must be none or mirrored"
        )
        _require_processes(self.processes, "train.processes")
        _require(bool(self.experiment), "train.experiment", "must be a name")

    @property
    def spec(self) -> ModelSpec:
        """The fields of this section that define the trained network (see :class:`ModelSpec`)."""
        return ModelSpec(self.model, self.loss, self.augment, self.precision)


# ------------------------------------------------------------------------------------- evaluate
@dataclass(frozen=True)
class QualityParams:
    """Thresholds of the per-scan quality flag (see :mod:`liverseg.evaluation.quality`)."""

    min_volume_ml: float = 600.0
    max_volume_ml: float = 4000.0
    min_agreement: float = 0.9
    body_hu: float = -500.0

    def __post_init__(self) -> None:
        _require(self.min_volume_ml >= 0, "evaluate.quality.min_volume_ml", "must be >= 0")
        _require(
            self.max_volume_ml > self.min_volume_ml,
            "evaluate.quality.max_volume_ml",
            "must be > evaluate.quality.min_volume_ml",
        )
        _require(
            0 <= self.min_agreement <= 1, "evaluate.quality.min_agreement", "must be in [0, 1]"
        )


@dataclass(frozen=True)
class EvaluateParams:
    threshold: float = 0.5
    largest_component: bool = True
    fill_holes: bool = False
    batch_size: int = 32
    overlays_per_patient: int = 3
    experiment: str = "liverseg"
    nsd_tolerances_mm: tuple[float, ...] = (2.5, 5.0)
    quality: QualityParams = field(default_factory=QualityParams)

    def __post_init__(self) -> None:
        _require(0 < self.threshold < 1, "evaluate.threshold", "must be in (0, 1)")
        _require(self.batch_size >= 1, "evaluate.batch_size", "must be >= 1")
        _require(self.overlays_per_patient >= 0, "evaluate.overlays_per_patient", "must be >= 0")
        _require(
            all(t >= 0 for t in self.nsd_tolerances_mm),
            "evaluate.nsd_tolerances_mm",
            "must be a list of tolerances >= 0 (mm)",
        )


# ------------------------------------------------------------------------------------- register
@dataclass(frozen=True)
class RegisterParams:
    model_name: str = "liver-unet"

    def __post_init__(self) -> None:
        _require(bool(self.model_name), "register.model_name", "must be a name")


SECTIONS: dict[str, type] = {
    "ingest": IngestParams,
    "prepare": PrepareParams,
    "tune": TuneParams,
    "train": TrainParams,
    "evaluate": EvaluateParams,
    "register": RegisterParams,
}


def build(cls: type[T], data: Any, prefix: str) -> T:
    """Build the frozen dataclass ``cls`` from a mapping, checking keys and types."""
    if data is None:
        data = {}
    _require(isinstance(data, dict), prefix, f"must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - names)
    _require(not unknown, f"{prefix}.{unknown[0]}" if unknown else prefix, "unknown key")
    kwargs = {k: _coerce(hints[k], v, f"{prefix}.{k}") for k, v in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as exc:  # pragma: no cover - defensive
        raise ParamsError(f"params: {prefix}: {exc}") from exc


def _coerce(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return build(tp, value, key)  # type: ignore[arg-type]
    if origin is tuple:
        _require(isinstance(value, list | tuple), key, "must be a list")
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(args[0], v, f"{key}[{i}]") for i, v in enumerate(value))
        _require(len(value) == len(args), key, f"must have {len(args)} items")
        return tuple(
            _coerce(a, v, f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value, strict=True))
        )
    if origin in (typing.Union, types.UnionType):  # checked by the dataclass' __post_init__
        return value
    if tp is bool:
        _require(isinstance(value, bool), key, f"must be true or false, got {value!r}")
        return value
    if tp is int:
        _require(
            isinstance(value, int) and not isinstance(value, bool),
            key,
            f"must be an integer, got {value!r}",
        )
        return value
    if tp is float:
        _require(
            isinstance(value, int | float) and not isinstance(value, bool),
            key,
            f"must be a number, got {value!r}",
        )
        return float(value)
    if tp is str:
        _require(isinstance(value, str), key, f"must be a string, got {value!r}")
        return value
    return value  # pragma: no cover


class _UniqueKeyLoader(yaml.SafeLoader):
    """A safe loader that refuses a key given twice in one mapping, as ``dvc repro`` does
    (plain YAML loaders keep the last one silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def read_params(path: Path = Path("params.yaml")) -> dict[str, Any]:
    """Read ``params.yaml`` (the raw mapping); duplicate keys and unknown sections are errors."""
    path = Path(path)
    try:
        data = yaml.load(path.read_text(), Loader=_UniqueKeyLoader)  # noqa: S506 (a safe loader)
    except FileNotFoundError as exc:
        raise ParamsError(f"params: {path} not found (run from the repository root)") from exc
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        raise ParamsError(f"params: {where}: {exc.problem}") from exc
    except yaml.YAMLError as exc:
        raise ParamsError(f"params: {path} is not valid YAML: {exc}") from exc
    _require(isinstance(data, dict), str(path), "must be a mapping of sections")
    unknown = sorted(str(k) for k in data if k not in SECTIONS)
    _require(
        not unknown,
        f"{unknown[0]}" if unknown else "",
        f"unknown section in {path} (known: {', '.join(SECTIONS)})",
    )
    return data


def load_section(section: str, path: Path = Path("params.yaml")) -> Any:
    """Load one stage's section of ``params.yaml`` as its frozen dataclass."""
    _require(section in SECTIONS, section, f"unknown section (known: {sorted(SECTIONS)})")
    data = read_params(path)
    return build(SECTIONS[section], data.get(section, {}), section)


def as_flat_dict(obj: Any, prefix: str = "") -> dict[str, Any]:
    """Flatten a params dataclass to ``{"model.depth": 4, ...}`` for MLflow params."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(v):
            out.update(as_flat_dict(v, key + "."))
        elif isinstance(v, tuple):
            out[key] = list(v)
        else:
            out[key] = v
    return out
