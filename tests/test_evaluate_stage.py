"""The evaluate stage's ``main`` on tiny data: three phantom cases, a one-convolution model
folder, a private SQLite store. Seconds, where the end-to-end run takes minutes."""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import MlflowStore
from liverseg.data.layout import find_nifti_pairs
from liverseg.data.phantom import write_phantom
from liverseg.data.volumes import load_case
from liverseg.errors import DataError
from liverseg.evaluation.metrics import volume_metrics
from liverseg.fsutil import write_json
from liverseg.inference import PostProcessing, Segmenter
from liverseg.model.folder import save_model_dir
from liverseg.params import PhantomParams
from liverseg.stages import evaluate as stage
from test_model_dir import one_conv_model


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """raw/ (3 phantom cases), prepared/splits.json (2 test cases) and models/."""
    root = tmp_path_factory.mktemp("evaluate-inputs")
    ids = write_phantom(
        root / "raw", PhantomParams(n_cases=3, size=32, n_slices=8, spacing=(6.0, 6.0, 8.0))
    )
    splits = {"seed": 0, "n_test": 2, "k_folds": 1, "test": ids[1:], "folds": [ids[:1]]}
    write_json(root / "prepared" / "splits.json", splits)
    # The 1x1 convolution segments HU >= 50 (see test_model_dir): the liver, and more.
    save_model_dir(root / "models", one_conv_model(), window=(-100, 400), image_size=16)
    return root


def args_for(root: Path, work: Path, train_run: Path) -> argparse.Namespace:
    params = work / "params.yaml"
    params.write_text(
        yaml.safe_dump(
            {"evaluate": {"batch_size": 4, "overlays_per_patient": 2, "fill_holes": True}}
        )
    )
    return argparse.Namespace(
        raw=root / "raw",
        prepared=root / "prepared",
        model_dir=root / "models",
        train_run=train_run,
        out=work / "reports" / "evaluate",
        params=params,
    )


def train_parent(store: MlflowStore, work: Path) -> tuple[Path, str]:
    """A finished training parent run and the run.json that links to it."""
    import mlflow

    exp_id = store.experiment("liverseg-test")
    with mlflow.start_run(experiment_id=exp_id, run_name="train") as run:
        parent = str(run.info.run_id)
    link = {"experiment_id": exp_id, "parent_run_id": parent, "final_run_id": ""}
    write_json(work / "run.json", {**link, "tracking_uri": store.uri})
    return work / "run.json", parent


def test_evaluate_main_writes_metrics_and_a_finished_run(
    inputs: Path, mlflow_store: MlflowStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlflow import MlflowClient

    monkeypatch.chdir(tmp_path)  # no dvc.lock here: the data's hash is logged as unknown
    run_json, parent = train_parent(mlflow_store, tmp_path)
    args = args_for(inputs, tmp_path, run_json)
    stage.main(args)

    metrics = json.loads((args.out / "metrics.json").read_text())
    test_ids = json.loads((inputs / "prepared" / "splits.json").read_text())["test"]
    assert [r["case"] for r in metrics["per_patient"]] == test_ids
    assert metrics["n_patients"] == 2
    # Each patient's Dice is the one of the Segmenter (post-processing of params.yaml, fill
    # holes on) against that patient's own mask.
    seg = Segmenter.from_dir(inputs / "models", post=PostProcessing(fill_holes=True))
    pairs = {p.case_id: p for p in find_nifti_pairs(inputs / "raw")}
    dice = []
    for row in metrics["per_patient"]:
        pair = pairs[row["case"]]
        case = load_case(pair.image, pair.mask, case_id=pair.case_id)
        pred = seg.segment_ras(case.image.data)
        m = volume_metrics(pred, case.mask.data, case.image.spacing, (2.5,))
        assert row["dice"] == pytest.approx(m["dice"], abs=1e-12)
        dice.append(m["dice"])
    assert min(dice) > 0.0 and max(dice) < 1.0  # a real, imperfect segmentation
    assert metrics["dice_mean"] == pytest.approx(np.mean(dice), abs=1e-12)

    with open(args.out / "per_patient.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["case"] for r in rows] == test_ids
    assert [float(r["dice"]) for r in rows] == pytest.approx(dice, abs=1e-9)
    assert len(list((args.out / "overlays").glob("*.png"))) == 4

    client = MlflowClient()
    runs = client.search_runs(
        [client.get_run(parent).info.experiment_id], filter_string="tags.kind = 'evaluate'"
    )
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.tags["mlflow.parentRunId"] == parent
    # the headline figures rounded for the runs table, the exact values beside them
    assert run.data.metrics["test_dice_mean"] == round(metrics["dice_mean"], 4)
    assert run.data.metrics["test_dice_mean_exact"] == metrics["dice_mean"]
    assert run.data.metrics["test_hd95_mm_mean"] == round(metrics["hd95_mm_mean"], 4)
    for row in metrics["per_patient"]:
        assert run.data.metrics[f"test_dice_{row['case']}"] == pytest.approx(row["dice"])
    assert run.data.params["fill_holes"] == "True"
    # Each patient's two overlays at steps 0 and 1, where the UI's image slider starts.
    images = [f.path for f in client.list_artifacts(run.info.run_id, "images")]
    steps: dict[str, list[int]] = {}
    for name in images:
        if name.endswith(".png"):
            key, step = Path(name).name.split("+step+")
            steps.setdefault(key, []).append(int(step.split("+")[0]))
    assert {k: sorted(v) for k, v in steps.items()} == {
        f"overlay_{case}": [0, 1] for case in test_ids
    }, images
    on_parent = client.get_run(parent).data.metrics
    assert on_parent["test_dice_mean"] == round(metrics["dice_mean"], 4)
    assert on_parent["test_dice_mean_exact"] == metrics["dice_mean"]


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (None, r"run\.json: not found \(run the train stage first\)"),
        ("{}", r"run\.json: parent_run_id: missing"),
    ],
)
def test_evaluate_requires_the_train_run_json(
    inputs: Path, tmp_path: Path, content: str | None, match: str
) -> None:
    run_json = tmp_path / "run.json"
    if content is not None:
        run_json.write_text(content)
    args = args_for(inputs, tmp_path, run_json)
    with pytest.raises(DataError, match=match):
        stage.main(args)
    assert not (tmp_path / "reports").exists()


def test_a_copied_repository_keeps_its_artifacts_in_the_copy(
    inputs: Path, empty_mlflow_db: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``cp -a`` of a repository with its store, then a stage run in the copy: every new
    artifact lands in the copy, none in the original, and the old runs read the copied files.
    (MLflow keeps absolute artifact locations in the database.)"""
    import mlflow
    from mlflow import MlflowClient

    from liverseg.tracking import ensure_experiment

    original, copy = tmp_path / "original", tmp_path / "copy"
    (original / "mlruns").mkdir(parents=True)
    shutil.copy(empty_mlflow_db, original / "mlruns" / "mlflow.db")
    monkeypatch.chdir(original)
    mlflow.set_tracking_uri(f"sqlite:///{original}/mlruns/mlflow.db")
    try:
        exp_id = ensure_experiment("liverseg-test")
        with mlflow.start_run(experiment_id=exp_id, run_name="train") as run:
            mlflow.log_text("from the original", "note.txt")
            parent = str(run.info.run_id)
        link = {"experiment_id": exp_id, "parent_run_id": parent, "final_run_id": ""}
        write_json(original / "run.json", link)
        subprocess.run(["cp", "-a", str(original), str(copy)], check=True)
        before = files_under(original)

        monkeypatch.chdir(copy)
        mlflow.set_tracking_uri(f"sqlite:///{copy}/mlruns/mlflow.db")
        stage.main(args_for(inputs, copy, copy / "run.json"))

        assert files_under(original) == before  # nothing new in the original
        client = MlflowClient()
        runs = client.search_runs([exp_id])
        assert len(runs) == 2  # train and evaluate
        evaluate = next(r for r in runs if r.data.tags.get("kind") == "evaluate")
        for r in runs:
            assert r.info.artifact_uri.startswith((copy / "mlruns/artifacts").as_uri()), r.info
        logged = {a.path for a in client.list_artifacts(evaluate.info.run_id)}
        assert {"evaluate", "images"} <= logged
        assert (copy / "mlruns/artifacts" / evaluate.info.run_id / "artifacts/evaluate").is_dir()
        # the train run's artifact is read from the copy, the original gone
        original.rename(tmp_path / "gone")
        text = mlflow.artifacts.load_text(f"runs:/{parent}/note.txt")
        assert text == "from the original"
    finally:
        mlflow.set_tracking_uri(None)


def files_under(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_size for p in folder.rglob("*") if p.is_file()}
