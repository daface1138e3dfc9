"""Typed, frozen view of ``params.yaml``: one pydantic dataclass per stage section.

Stages read their section once with :func:`load_section`; library code receives the
dataclass and never reads the YAML itself. Pydantic does the type checks (strict: ``"10"`` is
not an integer, ``yes`` not a boolean) and the range checks declared on each field; its errors
become one-line :class:`ParamsError` messages naming the dotted key (e.g. ``train.model.depth``),
whether the section comes from the YAML or a dataclass is built in code.
"""

from __future__ import annotations

import dataclasses
import functools
import operator
import re
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import pydantic
import yaml
from pydantic import AfterValidator, Field, PlainValidator, Strict, model_validator

from liverseg.errors import ParamsError

T = TypeVar("T")

Int = Annotated[int, Strict()]
Float = Annotated[float, Strict()]  # strict still takes an integer, as a float
Bool = Annotated[bool, Strict()]
Str = Annotated[str, Strict()]


def _check(ok: Callable[[Any], bool], msg: str) -> AfterValidator:
    """A field check whose failure reads ``<key>: <msg>``."""

    def check(value: T) -> T:
        if not ok(value):
            raise ValueError(msg)
        return value

    return AfterValidator(check)


def _range(
    lo: float, hi: float | None = None, *, lo_open: bool = False, hi_open: bool = False
) -> Any:
    """``>= lo`` (or ``> lo``), pydantic's own check; or ``must be in [lo, hi]``, open as asked."""
    if hi is None:
        return Field(gt=lo) if lo_open else Field(ge=lo)
    above = operator.gt if lo_open else operator.ge
    below = operator.lt if hi_open else operator.le
    msg = f"must be in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
    return _check(lambda v: above(v, lo) and below(v, hi), msg)


def _processes(value: object) -> str | int:
    """``auto`` or a positive integer (how many worker processes train at once)."""
    if value == "auto":
        return "auto"
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return value
    raise ValueError(f"must be auto or an integer >= 1, got {value!r}")


Processes = Annotated[str | int, PlainValidator(_processes)]
Name = Annotated[Str, _check(bool, "must be a name")]
LowHighMM = Annotated[
    tuple[Float, Float],
    _check(lambda v: 0 < v[0] <= v[1], "must be [low, high] with 0 < low <= high (mm)"),
]


class _KeyError(ValueError):
    """A check across fields, reported on ``field`` (pydantic would report the section)."""

    def __init__(self, field: str, msg: str) -> None:
        super().__init__(msg)
        self.field = field


_MESSAGES = {
    "int_type": "must be an integer, got {input!r}",
    "bool_type": "must be true or false, got {input!r}",
    "float_type": "must be a number, got {input!r}",
    "string_type": "must be a string, got {input!r}",
    "tuple_type": "must be a list, got {input!r}",
    "too_long": "must have at most {max_length} items",
    "greater_than_equal": "must be >= {ge:g}",
    "greater_than": "must be > {gt:g}",
    "missing": "missing (too few items)",
    "literal_error": "must be {expected}, got {input!r}",
    "unexpected_keyword_argument": "unknown key",
    "extra_forbidden": "unknown key",
    "dataclass_type": "must be a mapping, got {type}",
    "dataclass_args_type": "must be a mapping, got {type}",
}


def _message(exc: pydantic.ValidationError, prefix: str, names: list[str] | None = None) -> str:
    """Pydantic's first error as ``params: <dotted key>: <problem>`` (``names``: the fields, for
    an error on a positional argument)."""
    err = exc.errors()[0]
    loc = list(err["loc"])
    if names and loc and isinstance(loc[0], int):
        loc[0] = names[loc[0]]
    ctx = dict(err.get("ctx") or {})
    cause = ctx.get("error")
    if isinstance(cause, _KeyError):
        loc.append(cause.field)
    key = prefix + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc)
    if err["type"] == "value_error":
        msg = str(cause)
    elif err["type"] in _MESSAGES:
        value = err.get("input")
        msg = _MESSAGES[err["type"]].format(input=value, type=type(value).__name__, **ctx)
    else:
        msg = err["msg"]
    return f"params: {key}: {msg}"


@typing.dataclass_transform(frozen_default=True, field_specifiers=(dataclasses.field,))
def _params(key: str) -> Callable[[type[T]], type[T]]:
    """A frozen, strict pydantic dataclass for the section at ``key`` of ``params.yaml``,
    whose validation errors (``dataclasses.replace`` included) are :class:`ParamsError`."""

    def wrap(cls: type[T]) -> type[T]:
        cls = pydantic.dataclasses.dataclass(  # type: ignore[assignment]
            frozen=True, config=pydantic.ConfigDict(extra="forbid")
        )(cls)
        init, names = cls.__init__, [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]

        @functools.wraps(init)
        def __init__(self: T, *args: Any, **kwargs: Any) -> None:
            try:
                init(self, *args, **kwargs)
            except pydantic.ValidationError as exc:
                raise ParamsError(_message(exc, key, names)) from None

        cls.__init__ = __init__  # type: ignore[method-assign,assignment]
        return cls

    return wrap


# --------------------------------------------------------------------------------------- ingest
@_params("ingest.phantom")
class PhantomParams:
    n_cases: Annotated[Int, _range(2)] = 12
    size: Annotated[Int, _range(16, 1024)] = 128
    n_slices: Annotated[Int, _range(8, 1024)] = 48
    spacing: Annotated[
        tuple[Float, Float, Float],
        _check(lambda s: all(v > 0 for v in s), "must be three positive numbers (mm)"),
    ] = (2.5, 2.5, 4.0)
    seed: Int = 0


@_params("ingest.synth")
class SynthParams:
    """``ingest.synth``: synthetic CT from the label maps (liverseg.data.synth)."""

    pixel_mm: LowHighMM = (0.5, 1.0)
    thickness_mm: LowHighMM = (1.0, 5.0)
    matrix: Annotated[Int, _range(64, 1024)] = 256
    cut_prob: Annotated[Float, _range(0, 1)] = 0.5
    draws: Annotated[Int, _range(1, 100)] = 1
    seed: Int = 0


@_params("ingest.ircad")
class IrcadParams:
    source: Str = ""
    sha256: Annotated[
        Str,
        _check(lambda s: re.fullmatch("([0-9a-fA-F]{64})?", s), "must be empty or 64 hex digits"),
    ] = ""
    format: Literal["nifti-zip", "dicom-zip", "nifti-dir", "dicom-dir"] = "nifti-zip"
    max_unpacked_gb: Annotated[Float, _range(0, lo_open=True)] = 20.0


@_params("ingest")
class IngestParams:
    dataset: Literal["synth", "phantom", "ircad"] = "synth"
    synth: SynthParams = dataclasses.field(default_factory=SynthParams)
    phantom: PhantomParams = dataclasses.field(default_factory=PhantomParams)
    ircad: IrcadParams = dataclasses.field(default_factory=IrcadParams)

    @model_validator(mode="after")
    def _source_for_ircad(self) -> IngestParams:
        if self.dataset == "ircad" and not self.ircad.source:
            raise _KeyError("ircad.source", "must be set for ircad")
        return self


# -------------------------------------------------------------------------------------- prepare
@_params("prepare")
class PrepareParams:
    window: Annotated[
        tuple[Float, Float],
        _check(lambda w: w[0] < w[1], "must be [low, high] with low < high (HU)"),
    ] = (-100.0, 400.0)
    image_size: Annotated[
        Int, _range(16, 1024), _check(lambda v: v % 16 == 0, "must be a multiple of 16")
    ] = 96
    liver_free_fraction: Annotated[Float, _range(0, 1)] = 0.3
    slice_gap_mm: Annotated[Float, _range(0)] = 0.0
    context_mm: Annotated[Float, _range(0)] = 0.0
    n_test: Annotated[Int, _range(1)] = 3
    test_cases: Annotated[
        tuple[Name, ...], _check(lambda t: len(set(t)) == len(t), "names a case twice")
    ] = ()
    k_folds: Annotated[Int, _range(2)] = 3
    seed: Int = 42

    @model_validator(mode="after")
    def _test_cases_fit(self) -> PrepareParams:
        if len(self.test_cases) > self.n_test:
            raise _KeyError("test_cases", "must not name more cases than prepare.n_test")
        return self


# ----------------------------------------------------------------------------------------- tune
@_params("tune")
class TuneParams:
    n_trials: Annotated[Int, _range(1)] = 4
    timeout_s: Annotated[Float, _range(0, lo_open=True)] = 3600.0
    epochs: Annotated[Int, _range(1)] = 4
    folds: Annotated[
        tuple[Annotated[Int, _range(0)], ...], _check(bool, "must list at least one fold")
    ] = (0,)
    lr_min: Float = 1e-3
    lr_max: Float = 1e-2
    batch_sizes: Annotated[
        tuple[Annotated[Int, _range(1)], ...], _check(bool, "must list positive batch sizes")
    ] = (4, 8, 16)
    pruner_warmup_epochs: Annotated[Int, _range(0)] = 1
    generation_size: Annotated[Int, _range(1)] = 1
    processes: Processes = 1
    seed: Int = 42
    storage: Annotated[Str, _check(bool, "must be a storage URL")] = "sqlite:///optuna/optuna.db"

    @model_validator(mode="after")
    def _lr_range(self) -> TuneParams:
        if not 0 < self.lr_min < self.lr_max:
            raise _KeyError("lr_min", "need 0 < lr_min < lr_max")
        return self


# ---------------------------------------------------------------------------------------- train
@_params("train.model")
class ModelParams:
    depth: Annotated[Int, _range(1, 6)] = 4
    base_filters: Annotated[Int, _range(1)] = 16
    dropout: Annotated[Float, _range(0, 1, hi_open=True)] = 0.1
    batch_norm: Bool = True


@_params("train.augment")
class AugmentParams:
    flip: Bool = False
    rotate_deg: Annotated[Float, _range(0, 180)] = 10.0
    scale: Annotated[Float, _range(0, 1, hi_open=True)] = 0.1
    intensity: Annotated[Float, _range(0, 1, hi_open=True)] = 0.05
    blur_prob: Annotated[Float, _range(0, 1)] = 0.2


Loss = Literal["dice_bce", "dice"]
Precision = Literal["float32", "mixed_bfloat16"]


@_params("train")
class ModelSpec:
    """What defines the network that :func:`liverseg.training.fit.fit` trains: architecture,
    loss, augmentation and precision (the train section's fields that ``tune`` hashes into its
    study's name and lists as ``params`` in ``dvc.yaml``). Built by :attr:`TrainParams.spec`."""

    model: ModelParams = dataclasses.field(default_factory=ModelParams)
    loss: Loss = "dice_bce"
    augment: AugmentParams = dataclasses.field(default_factory=AugmentParams)
    precision: Precision = "float32"


@_params("train")
class TrainParams(ModelSpec):
    learning_rate: Annotated[Float, _range(0, lo_open=True)] = 2e-3
    batch_size: Annotated[Int, _range(1)] = 16
    use_tuned: Bool = True
    epochs: Annotated[Int, _range(1)] = 14
    patience: Annotated[Int, _range(1)] = 4
    val_stride: Annotated[Int, _range(1)] = 1
    final: Literal["retrain", "ensemble"] = "ensemble"
    distribute: Literal["none", "mirrored"] = "none"
    processes: Processes = 1
    seed: Int = 42
    experiment: Name = "liverseg"

    @property
    def spec(self) -> ModelSpec:
        """The fields of this section that define the trained network (see :class:`ModelSpec`)."""
        return ModelSpec(self.model, self.loss, self.augment, self.precision)


# ------------------------------------------------------------------------------------- evaluate
@_params("evaluate.quality")
class QualityParams:
    """Thresholds of the per-scan quality flag (see :mod:`liverseg.evaluation.quality`)."""

    min_volume_ml: Annotated[Float, _range(0)] = 600.0
    max_volume_ml: Float = 4000.0
    min_agreement: Annotated[Float, _range(0, 1)] = 0.91
    body_hu: Float = -500.0

    @model_validator(mode="after")
    def _volume_range(self) -> QualityParams:
        if not self.max_volume_ml > self.min_volume_ml:
            raise _KeyError("max_volume_ml", "must be > evaluate.quality.min_volume_ml")
        return self


@_params("evaluate")
class EvaluateParams:
    threshold: Annotated[Float, _range(0, 1, lo_open=True, hi_open=True)] = 0.55
    largest_component: Bool = True
    fill_holes: Bool = False
    batch_size: Annotated[Int, _range(1)] = 32
    overlays_per_patient: Annotated[Int, _range(0)] = 3
    experiment: Name = "liverseg"
    nsd_tolerances_mm: tuple[Annotated[Float, _range(0)], ...] = (2.5, 5.0)
    quality: QualityParams = dataclasses.field(default_factory=QualityParams)


# ------------------------------------------------------------------------------------- register
@_params("register")
class RegisterParams:
    model_name: Name = "liver-unet"


SECTIONS: dict[str, type] = {
    "ingest": IngestParams,
    "prepare": PrepareParams,
    "tune": TuneParams,
    "train": TrainParams,
    "evaluate": EvaluateParams,
    "register": RegisterParams,
}


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


def load_section(section: str, path: Path = Path("params.yaml")) -> Any:
    """Load one stage's section of ``params.yaml`` as its frozen dataclass; duplicate keys and
    unknown sections of the file are errors too."""
    if section not in SECTIONS:
        raise ParamsError(f"params: {section}: unknown section (known: {sorted(SECTIONS)})")
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
    if not isinstance(data, dict):
        raise ParamsError(f"params: {path}: must be a mapping of sections")
    unknown = sorted(str(k) for k in data if k not in SECTIONS)
    if unknown:
        known = ", ".join(SECTIONS)
        raise ParamsError(f"params: {unknown[0]}: unknown section in {path} (known: {known})")
    raw = data.get(section)
    try:
        return pydantic.TypeAdapter(SECTIONS[section]).validate_python({} if raw is None else raw)
    except pydantic.ValidationError as exc:
        raise ParamsError(_message(exc, section)) from None


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
