"""params.yaml: typed sections, unknown keys and bad values named by their dotted key."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import yaml

from liverseg.errors import ParamsError
from liverseg.params import (
    SECTIONS,
    ModelParams,
    TrainParams,
    TuneParams,
    as_flat_dict,
    load_section,
)

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("section", sorted(SECTIONS))
def test_repository_params_load(section: str) -> None:
    load_section(section, REPO / "params.yaml")


def _write(tmp_path: Path, data: dict) -> Path:
    p = tmp_path / "params.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


@pytest.mark.parametrize(
    ("section", "data", "match"),
    [
        ("prepare", {"image_size": 100}, r"prepare\.image_size: must be a multiple of 16"),
        ("prepare", {"window": [400, -100]}, r"prepare\.window"),
        ("prepare", {"bogus": 1}, r"prepare\.bogus: unknown key"),
        ("train", {"model": {"depth": 9}}, r"train\.model\.depth: must be in \[1, 6\]"),
        ("train", {"model": {"filters": 9}}, r"train\.model\.filters: unknown key"),
        ("train", {"epochs": "ten"}, r"train\.epochs: must be an integer"),
        ("train", {"use_tuned": "yes"}, r"train\.use_tuned: must be true or false"),
        ("train", {"val_stride": 0}, r"train\.val_stride: must be >= 1"),
        ("tune", {"lr_min": 0.1, "lr_max": 0.01}, r"tune\.lr_min"),
        ("ingest", {"dataset": "lits"}, r"ingest\.dataset"),
        ("ingest", {"ircad": {"sha256": "abc"}}, r"ingest\.ircad\.sha256"),
        ("ingest", {"synth": {"pixel_mm": [1.0, 0.5]}}, r"ingest\.synth\.pixel_mm: must be \["),
        ("ingest", {"synth": {"pixel_mm": [0.5]}}, r"ingest\.synth\.pixel_mm\[1\]: missing"),
        ("ingest", {"synth": {"thickness_mm": [0, 5]}}, r"ingest\.synth\.thickness_mm"),
        ("ingest", {"synth": {"matrix": 32}}, r"ingest\.synth\.matrix: must be in \[64, 1024\]"),
        ("ingest", {"synth": {"matrix": 2048}}, r"ingest\.synth\.matrix: must be in"),
        ("ingest", {"synth": {"cut_prob": 1.5}}, r"ingest\.synth\.cut_prob: must be in \[0, 1\]"),
        ("ingest", {"synth": {"cut_prob": -0.1}}, r"ingest\.synth\.cut_prob: must be in"),
        ("ingest", {"synth": {"seed": "one"}}, r"ingest\.synth\.seed: must be an integer"),
        ("ingest", {"synth": {"pixels": 1}}, r"ingest\.synth\.pixels: unknown key"),
        ("prepare", {"n_test": 1, "test_cases": ["e01", "e02"]}, r"prepare\.test_cases: must not"),
        ("prepare", {"test_cases": ["e01", "e01"]}, r"prepare\.test_cases: names a case twice"),
        ("prepare", {"test_cases": "e01"}, r"prepare\.test_cases: must be a list"),
        ("prepare", {"test_cases": [1]}, r"prepare\.test_cases\[0\]: must be a string"),
        ("ingest", {"dataset": "ircad"}, r"ingest\.ircad\.source: must be set for ircad"),
        ("tune", {"processes": 0}, r"tune\.processes: must be auto or an integer >= 1"),
        ("tune", {"folds": [-1]}, r"tune\.folds\[0\]: must be >= 0"),
        ("evaluate", {"quality": {"max_volume_ml": 1}}, r"evaluate\.quality\.max_volume_ml"),
        ("train", [1], r"train: must be a mapping, got list"),
    ],
)
def test_bad_values_name_the_key(tmp_path: Path, section: str, data: dict, match: str) -> None:
    with pytest.raises(ParamsError, match=match):
        load_section(section, _write(tmp_path, {section: data}))


def test_flat_dict_for_mlflow() -> None:
    flat = as_flat_dict(load_section("train", REPO / "params.yaml"))
    assert flat["model.depth"] >= 1
    assert "augment.flip" in flat


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (lambda: TrainParams(distribute="horovod"), r"^params: train\.distribute: must be"),
        (lambda: ModelParams(9), r"^params: train\.model\.depth: must be in \[1, 6\]"),
        (
            lambda: dataclasses.replace(TrainParams(), model=ModelParams(dropout=1.0)),
            r"^params: train\.model\.dropout: must be in \[0, 1\)",
        ),
        (lambda: TuneParams(epochs="4"), r"^params: tune\.epochs: must be an integer, got '4'"),
    ],
)
def test_built_in_code_the_same_errors(build: Any, match: str) -> None:
    """A section built in code (or changed with dataclasses.replace) is checked as the YAML is."""
    with pytest.raises(ParamsError, match=match):
        build()


def test_integers_become_floats_and_lists_tuples(tmp_path: Path) -> None:
    p = _write(tmp_path, {"ingest": {"phantom": {"spacing": [2, 2, 4]}}})
    assert load_section("ingest", p).phantom.spacing == (2.0, 2.0, 4.0)
    assert all(type(v) is float for v in load_section("ingest", p).phantom.spacing)
