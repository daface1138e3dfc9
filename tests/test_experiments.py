"""What makes experiments comparable: params.yaml in DVC's style, committed metrics, the
MLflow store under `dvc exp` temp copies, descriptions, curves, the offline plots page."""

from __future__ import annotations

import difflib
import shutil
import subprocess
from pathlib import Path

import mlflow
import pytest
import yaml

from conftest import MlflowStore
from liverseg.cli import resolve_tracking_uri
from liverseg.registry import decision_text, model_card
from liverseg.tracking import (
    EXPERIMENT_KIND,
    EXPERIMENT_KIND_TAG,
    NOTE_TAG,
    ensure_experiment,
    git_commit,
)
from liverseg.training.crossval import curves_figure, write_curves_csv

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------ params.yaml
def test_params_yaml_is_a_fixed_point_of_dvcs_rewrite(tmp_path: Path) -> None:
    """`dvc exp run -S` rewrites params.yaml in its own YAML style: it must change nothing but
    the value it sets (no reformatted lists or quotes)."""
    from dvc.utils.hydra import apply_overrides

    original = (REPO / "params.yaml").read_text()
    epochs = yaml.safe_load(original)["train"]["epochs"]
    same = tmp_path / "params.yaml"
    shutil.copy(REPO / "params.yaml", same)
    apply_overrides(same, [f"train.epochs={epochs}"])
    assert same.read_text() == original

    changed = tmp_path / "changed" / "params.yaml"
    changed.parent.mkdir()
    shutil.copy(REPO / "params.yaml", changed)
    apply_overrides(changed, [f"train.epochs={epochs + 1}"])
    diff = [
        line
        for line in difflib.unified_diff(original.splitlines(), changed.read_text().splitlines())
        if line[:1] in "+-" and not line.startswith(("+++", "---"))
    ]
    assert len(diff) == 2, diff
    assert diff[0].split("#")[0].split() == ["-", "epochs:", str(epochs)]
    assert diff[1].split("#")[0].split() == ["+", "epochs:", str(epochs + 1)]


def test_cache_false_outputs_are_committed_not_ignored() -> None:
    """`cache: false` outputs (metrics, curves, reports) are git's to version: none may be
    git-ignored, or `dvc exp show` has no baseline figures to compare with."""
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    uncached = [
        next(iter(out))
        for stage in stages.values()
        for section in ("outs", "metrics", "plots")
        for out in stage.get(section, [])
        if isinstance(out, dict) and next(iter(out.values())).get("cache") is False
    ]
    assert "reports/train/metrics.json" in uncached and "reports/train/curves.csv" in uncached
    paths = [p.replace("${ingest.dataset}", "phantom") for p in uncached]
    proc = subprocess.run(
        ["git", "check-ignore", "--no-index", *paths], cwd=REPO, capture_output=True, text=True
    )
    assert proc.stdout.strip() == "", f"git-ignored cache: false outputs: {proc.stdout}"
    # and the cached ones stay ignored
    cached = ["models/model.keras", "data/prepared/x", "reports/evaluate/overlays/a.png"]
    proc = subprocess.run(
        ["git", "check-ignore", "--no-index", *cached], cwd=REPO, capture_output=True, text=True
    )
    assert proc.stdout.split() == cached


# ----------------------------------------------------------------------- MLflow store and tags
@pytest.mark.parametrize(
    ("uri", "root", "expected"),
    [
        # a queued experiment: cwd is a temporary copy, DVC_ROOT the repository
        (None, "/repo", "sqlite:////repo/mlruns/mlflow.db"),
        ("sqlite:///other/m.db", "/repo", "sqlite:////repo/other/m.db"),
        # absolute paths and servers are left alone
        ("sqlite:////abs/m.db", "/repo", "sqlite:////abs/m.db"),
        ("http://127.0.0.1:5000", "/repo", "http://127.0.0.1:5000"),
        # no DVC: relative to the working directory, as before
        (None, None, "sqlite:///mlruns/mlflow.db"),
    ],
)
def test_tracking_uri_follows_dvc_root(uri: str | None, root: str | None, expected: str) -> None:
    env = {"DVC_ROOT": root} if root else {}
    assert resolve_tracking_uri(uri, env) == expected


def test_tracking_uri_stays_relative_in_the_repository_itself(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # `dvc repro`: DVC_ROOT is the working directory
    uri = resolve_tracking_uri(None, {"DVC_ROOT": str(tmp_path)})
    assert uri == "sqlite:///mlruns/mlflow.db"


def test_experiment_is_a_described_model_training_experiment(tmp_path: Path) -> None:
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/m.db")
    try:
        # an experiment made before this change (no tags) gets them on the next stage run
        old = mlflow.create_experiment("old", artifact_location=(tmp_path / "a").as_uri())
        assert ensure_experiment("old") == old
        for name in ("old", "new"):
            exp = mlflow.get_experiment(ensure_experiment(name))
            assert exp.tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND == "custom_model_development"
            assert "U-Net" in exp.tags[NOTE_TAG]
        new = mlflow.get_experiment_by_name("new")
        assert new is not None
        # artifacts beside the SQLite store, not in the working directory
        assert new.artifact_location == (tmp_path / "artifacts").as_uri()
        # a description a user wrote is kept
        mlflow.MlflowClient().set_experiment_tag(new.experiment_id, NOTE_TAG, "mine")
        ensure_experiment("new")
        assert mlflow.get_experiment(new.experiment_id).tags[NOTE_TAG] == "mine"
    finally:
        mlflow.set_tracking_uri(None)


def _git(repo: Path, *args: str) -> None:
    subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True)


def test_git_commit_is_not_dirty_for_what_dvc_repro_writes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for f in ("dvc.lock", "reports/train/metrics.json", "src.py"):
        (tmp_path / f).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / f).write_text("a\n")
    _git(tmp_path, "init", "-q")
    _git(tmp_path, "add", "-A")
    _git(tmp_path, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "c")
    monkeypatch.chdir(tmp_path)
    clean = git_commit()
    assert len(clean) == 40
    (tmp_path / "dvc.lock").write_text("b\n")
    (tmp_path / "reports/train/metrics.json").write_text("b\n")
    assert git_commit() == clean
    (tmp_path / "src.py").write_text("b\n")
    assert git_commit() == clean + "-dirty"


# ------------------------------------------------------------------------------------ curves
HISTORIES = {
    "fold-0": {"val_dice": [0.5, 0.7], "val_loss": [0.9, 0.6], "loss": [1.0, 0.8]},
    "fold-1": {"val_dice": [0.4, 0.6, 0.65], "val_loss": [1.0, 0.7, 0.6], "loss": [1, 1, 1]},
}


def test_curves_count_epochs_from_one_with_a_row_per_fold_and_epoch(tmp_path: Path) -> None:
    write_curves_csv(tmp_path / "curves.csv", HISTORIES)
    lines = (tmp_path / "curves.csv").read_text().splitlines()
    assert lines[0] == "fold,epoch,loss,val_dice,val_loss"
    assert [line.split(",")[:2] for line in lines[1:]] == [
        ["fold-0", "1"],
        ["fold-0", "2"],
        ["fold-1", "1"],
        ["fold-1", "2"],
        ["fold-1", "3"],
    ]
    assert lines[1] == "fold-0,1,1.0,0.5,0.9" and lines[2].split(",")[3] == "0.7"
    assert lines[5] == "fold-1,3,1,0.65,0.6"


def test_curves_figure_draws_a_line_per_fold_in_each_panel() -> None:
    fig = curves_figure(HISTORIES)
    dice, loss = fig.axes
    assert dice.get_ylabel() == "validation Dice" and loss.get_ylabel() == "validation loss"
    assert [list(line.get_xdata()) for line in dice.lines] == [[1, 2], [1, 2, 3]]
    assert [line.get_label() for line in loss.lines] == ["fold-0", "fold-1"]


# --------------------------------------------------------------------------------- model card
@pytest.mark.parametrize(
    ("decision", "dice", "before", "before_dice", "expected"),
    [
        ("champion", 0.9, None, None, "champion: the first version with a test Dice (0.9000)"),
        ("champion", 0.9, "1", 0.8, "champion: test Dice 0.9000 >= champion v1's 0.8000"),
        ("challenger", 0.7, "2", 0.8, "challenger: test Dice 0.7000 < champion v2's 0.8000"),
        ("challenger", 0.9, "3", None, "champion v3 has no readable test Dice, so it is kept"),
    ],
)
def test_decision_reads_as_a_sentence(
    decision: str, dice: float, before: str | None, before_dice: float | None, expected: str
) -> None:
    assert expected in decision_text(decision, dice, before, before_dice)


def test_a_champion_tested_on_other_patients_is_named_with_them() -> None:
    text = decision_text("challenger", 0.93, "4", 0.90, "e01,e03,e14")
    assert "champion v4 was tested on other patients (e01,e03,e14)" in text
    assert "0.9300 against 0.9000" in text and "do not compare" in text


def test_model_card_names_data_test_figures_preprocessing_and_use() -> None:
    card = model_card(
        decision="champion: ...",
        test={
            "dice_mean": 0.95712,
            "dice_std": 0.001,
            "hd95_mm_mean": 4.27,
            "n_patients": 3,
            "n_scans": 6,
        },
        data={"dvc_md5": "0123456789abcdef0123456789abcdef.dir", "sha256": "f" * 64},
        preprocessing={"window": [-100, 400], "image_size": 96},
        post={"threshold": 0.5, "largest_component": True, "fill_holes": False},
        train={"run_id": "r1", "cv_val_dice_mean": 0.948, "learning_rate": 0.003},
    )
    for text in (
        "Decision: champion",
        "6 scans of 3 held-out patients",
        "Dice 0.9571 ± 0.0010, HD95 4.3 mm",
        "DVC 0123456789abcdef0123456789abcdef.dir",
        "HU window [-100, 400]",
        "96 px",
        "threshold 0.5",
        "Not a medical device",
    ):
        assert text in card, text


# ------------------------------------------------------------------------- offline plots page
def test_plots_page_inlines_vega_and_keeps_dvcs_placeholder() -> None:
    from dvc_render.html import HTML

    from liverseg.plots_page import page

    text = page()
    assert "{plot_divs}" in text and "{scripts}" not in text  # no CDN <script src=...>
    assert "<script src" not in text and "window.vegaEmbed=" in text
    assert len(text) > 100_000  # the libraries themselves, not a link to them
    html = HTML(text).with_element("<div id='x'></div>").embed()
    assert "<div id='x'></div>" in html and "{plot_divs}" not in html


# ----------------------------------------------------------------------------- make compare
def test_compare_table_fits_100_columns_with_the_figures_that_matter() -> None:
    import csv
    import io

    from liverseg.compare import table

    head = "Experiment,rev,typ,cv_val_dice_mean,cv_val_dice_std,dice_mean,hd95_mm_mean,"
    head += "learning_rate,batch_size,model_gflops,train.model.depth\n"
    rows = list(
        csv.DictReader(
            io.StringIO(
                head
                + ",workspace,baseline,0.948123,0.0061,0.95712,4.27,0.003,8,1.234567,4\n"
                + ",main,baseline,0.948123,0.0061,0.95712,4.27,0.003,8,1.234567,4\n"
                + "one-epoch,1a2b3c4,branch_commit,0.5,0.1,!,,0.003,8,1.234567,4\n"
            )
        )
    )
    lines = table(rows).splitlines()
    assert lines[0].split() == [
        "experiment", "CV", "Dice", "±", "std", "test", "Dice", "HD95", "mm", "lr", "batch", "GFLOP"
    ]  # fmt: skip
    assert lines[2].split() == [
        "main",
        "0.9481",
        "0.0061",
        "0.9571",
        "4.3",
        "3.00e-03",
        "8",
        "1.235",
    ]
    # an experiment under its baseline, DVC's "!" (missing) and an empty figure kept visible
    assert lines[3].split() == ["one-epoch", "0.5000", "0.1000", "!", "-", "3.00e-03", "8", "1.235"]
    assert lines[3].startswith("  one-epoch")
    assert max(len(line) for line in lines) <= 100


def test_compare_shows_the_params_that_differ(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import io

    from liverseg.compare import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text(
        "train:\n  epochs: 16\n  model:\n    depth: 4\n  window: [-100, 400]\n"
    )
    csv_text = (
        "Experiment,rev,typ,cv_val_dice_mean,train.epochs,train.model.depth,train.window\n"
        + ',workspace,baseline,0.95,16,4,"[-100, 400]"\n'
        + ',main,baseline,0.95,16,4,"[-100, 400]"\n'
        + 'epochs-4,1a2b3c4,branch_commit,0.91,4,4,"[-100, 400]"\n'
    )
    assert main(io.StringIO(csv_text)) == 0
    out = capsys.readouterr().out
    head, changed = out.split("params that differ:")
    lines = changed.strip().splitlines()
    assert lines[0].split() == ["experiment", "train.epochs"]  # depth, window: the same
    assert lines[1].split() == ["workspace", "16"] and lines[3].split() == ["epochs-4", "4"]
    assert "0.9100" in head and max(len(line) for line in out.splitlines()) <= 100


def test_runs_logging_one_new_dataset_at_once_all_get_it(mlflow_store: MlflowStore) -> None:
    """Folds and tuning trials log the same dataset at once. MLflow checks for the dataset,
    then inserts it: the losers of that race got a unique-key violation (a tuning worker failed
    so under load). Eight runs at a barrier: each gets the dataset, none fails."""
    import threading

    from liverseg.tracking import log_dataset

    exp, n = mlflow_store.experiment("t"), 8
    barrier, errors, run_ids = threading.Barrier(n), [], []

    def one() -> None:
        try:
            with mlflow.start_run(experiment_id=exp) as run:
                run_ids.append(run.info.run_id)
                barrier.wait()
                log_dataset(Path("data/prepared"), "d" * 40, context="training")
        except Exception as exc:  # noqa: BLE001 - collected and asserted below
            errors.append(repr(exc))

    threads = [threading.Thread(target=one) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    client = mlflow.MlflowClient()
    for run_id in run_ids:
        inputs = client.get_run(run_id).inputs.dataset_inputs
        assert [(i.dataset.name, i.dataset.digest) for i in inputs] == [("data/prepared", "d" * 36)]
