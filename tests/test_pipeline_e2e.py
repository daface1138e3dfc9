"""The real `dvc repro` on a tiny copy of the repository, and what it leaves in MLflow."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import time
from pathlib import Path

import mlflow
import pytest
import yaml

from conftest import run, tool_env

pytestmark = pytest.mark.slow

QUEUE_TIMEOUT_S = 600


def test_outputs_exist(tiny_repo: Path) -> None:
    raw = sorted((tiny_repo / "data/raw/phantom").glob("*.nii.gz"))
    assert len(raw) == 12  # 6 cases x (CT, mask)
    splits = json.loads((tiny_repo / "data/prepared/splits.json").read_text())
    assert len(splits["test"]) == 2 and len(splits["folds"]) == 2
    assert (tiny_repo / "models/model.keras").exists()
    metrics = json.loads((tiny_repo / "reports/train/metrics.json").read_text())
    assert len(metrics["folds"]) == 2
    ev = json.loads((tiny_repo / "reports/evaluate/metrics.json").read_text())
    assert ev["n_patients"] == 2
    assert {r["case"] for r in ev["per_patient"]} == set(splits["test"])
    assert 0.0 <= ev["dice_mean"] <= 1.0
    assert list((tiny_repo / "reports/evaluate/overlays").glob("*.png"))
    best = json.loads((tiny_repo / "reports/tune/best_params.json").read_text())
    assert best["batch_size"] in (8, 16) and best["learning_rate"] > 0
    # train used the tuned values, not its own defaults
    assert metrics["learning_rate"] == pytest.approx(best["learning_rate"])
    assert metrics["batch_size"] == best["batch_size"]
    reg = json.loads((tiny_repo / "reports/register/register.json").read_text())
    assert reg["name"] == "liver-unet" and "champion" in reg["aliases"]


def test_dvc_lock_versions_the_data(tiny_repo: Path) -> None:
    lock = yaml.safe_load((tiny_repo / "dvc.lock").read_text())
    outs = {o["path"]: o for o in lock["stages"]["ingest"]["outs"]}
    assert outs["data/raw/phantom"]["md5"].endswith(".dir")


def test_second_repro_does_nothing(tiny_repo: Path) -> None:
    out = run(["dvc", "repro"], tiny_repo).stdout
    assert "Running stage" not in out, out
    status = run(["dvc", "status"], tiny_repo).stdout
    assert "up to date" in status, status


def test_bytecode_caches_are_not_dependencies(tiny_repo: Path) -> None:
    """A ``__pycache__`` in a source folder that stages depend on (written by any import of the
    code, rewritten when a source file is touched) leaves the pipeline up to date."""
    cache = tiny_repo / "src/liverseg/model/__pycache__"
    existed = cache.exists()
    pyc = cache / "unet.cpython-399.pyc"
    cache.mkdir(exist_ok=True)
    try:
        pyc.write_bytes(b"bytecode")
        status = run(["dvc", "status"], tiny_repo).stdout
        assert "up to date" in status, status
    finally:
        pyc.unlink(missing_ok=True)
        if not existed:
            cache.rmdir()


def test_changed_prepare_param_does_not_rerun_ingest(tiny_repo: Path) -> None:
    params = yaml.safe_load((tiny_repo / "params.yaml").read_text())
    params["prepare"]["liver_free_fraction"] = 0.5
    (tiny_repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    try:
        status = run(["dvc", "status"], tiny_repo).stdout
        assert "prepare:" in status and "ingest:" not in status, status
        out = run(["dvc", "repro", "prepare"], tiny_repo).stdout
        assert "Running stage 'prepare'" in out and "Running stage 'ingest'" not in out, out
    finally:
        run(["git", "checkout", "params.yaml"], tiny_repo)
        run(["dvc", "repro", "prepare"], tiny_repo)


def test_mlflow_holds_parent_fold_and_final_runs(tiny_repo: Path) -> None:
    mlflow.set_tracking_uri(f"sqlite:///{tiny_repo / 'mlruns/mlflow.db'}")
    try:
        runs = mlflow.search_runs(experiment_names=["liverseg"], output_format="pandas")
        train_parents = runs[runs["tags.stage"] == "train"]
        assert len(train_parents) >= 1
        parent_id = train_parents.iloc[0]["run_id"]
        children = runs[runs["tags.mlflow.parentRunId"] == parent_id]
        names = set(children["tags.mlflow.runName"])
        assert {"fold-0", "fold-1", "final", "evaluate", "register"} <= names, names
        assert (runs["status"] == "FINISHED").all()
        parent = train_parents.iloc[0]
        assert 0.0 <= parent["metrics.cv_val_dice_mean"] <= 1.0
        assert parent["tags.git_commit"] not in ("", "unknown")
        assert parent["tags.data_dvc_md5"].endswith(".dir")
        fold0 = children[children["tags.mlflow.runName"] == "fold-0"].iloc[0]
        hist = mlflow.MlflowClient().get_metric_history(fold0["run_id"], "val_dice")
        assert [m.step for m in hist] == list(range(1, len(hist) + 1)) and len(hist) >= 1
        lr_hist = mlflow.MlflowClient().get_metric_history(fold0["run_id"], "learning_rate")
        assert len(lr_hist) == len(hist)
    finally:
        mlflow.set_tracking_uri(None)


def test_queued_dvc_exp_lands_in_the_same_store_and_compares_with_the_baseline(
    tiny_repo: Path,
) -> None:
    """`dvc exp run --queue` + `dvc queue start` run in a temporary copy of the repository
    (.dvc/tmp/exps/...); the MLflow runs must land in the repository's own store, named after
    the experiment, and `dvc exp show` must show the committed baseline's figures beside it."""
    uri = f"sqlite:///{tiny_repo / 'mlruns/mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    try:
        before = mlflow.search_runs(experiment_names=["liverseg"], output_format="pandas")
        n_train = int((before["tags.stage"] == "train").sum())
        # folds in worker processes (the project's default; the tiny repo's is 1): their runs too
        exp = ["-S", "train.epochs=1", "-S", "train.processes=auto", "-n", "one-epoch"]
        run(["dvc", "exp", "run", "--queue", *exp], tiny_repo)
        run(["dvc", "queue", "start", "-j", "1"], tiny_repo)
        deadline = time.monotonic() + QUEUE_TIMEOUT_S
        while True:
            # Blocks while the experiment runs (an error while it is queued, not started): one
            # dvc process instead of a `dvc queue status` every 2 s, each a second of CPU.
            follow = ["dvc", "queue", "logs", "--follow", "one-epoch"]
            subprocess.run(
                follow, cwd=tiny_repo, env=tool_env(), capture_output=True, timeout=QUEUE_TIMEOUT_S
            )
            status = run(["dvc", "queue", "status"], tiny_repo).stdout
            line = next((x for x in status.splitlines() if "one-epoch" in x), "")
            if "Success" in line or "Failed" in line:
                break
            assert time.monotonic() < deadline, status
            time.sleep(2)
        assert "Success" in line, run(["dvc", "queue", "logs", "one-epoch"], tiny_repo).stdout
        after = mlflow.search_runs(experiment_names=["liverseg"], output_format="pandas")
        cv = after[after["tags.stage"] == "train"]
        assert len(cv) == n_train + 1
        exp_cv = cv[cv["tags.dvc_exp"] == "one-epoch"].iloc[0]
        assert exp_cv["tags.mlflow.runName"] == "cv-one-epoch"
        assert "`dvc exp` experiment `one-epoch`" in exp_cv["tags.mlflow.note.content"]
        assert 0.0 <= exp_cv["metrics.test_dice_mean"] <= 1.0  # evaluate ran and reported
        # tune's inputs did not change, so no new study ran (reports/tune is committed)
        assert (after["tags.mlflow.runName"].str.startswith("study-")).sum() == (
            before["tags.mlflow.runName"].str.startswith("study-")
        ).sum()
        # nothing was written to a store inside the temporary copy
        assert not list((tiny_repo / ".dvc/tmp").rglob("mlflow.db"))
        shown = run(["dvc", "exp", "show", "--no-pager", "--csv"], tiny_repo).stdout
        rows = list(csv.DictReader(io.StringIO(shown)))
        by_name = {r["Experiment"]: r for r in rows}
        assert "one-epoch" in by_name, shown
        # the committed baseline (its branch's row), not the workspace
        base = next(r for r in rows if r["typ"] == "baseline" and r["rev"] != "workspace")
        baseline = json.loads((tiny_repo / "reports/train/metrics.json").read_text())
        for row, want in ((base, baseline["cv_val_dice_mean"]), (by_name["one-epoch"], None)):
            value = row["cv_val_dice_mean"]
            assert value not in ("", "!"), shown  # a figure, not DVC's "missing"
            if want is not None:
                assert float(value) == pytest.approx(want, abs=1e-4)
    finally:
        mlflow.set_tracking_uri(None)
        subprocess.run(["dvc", "queue", "stop"], cwd=tiny_repo, env=tool_env(), check=False)
