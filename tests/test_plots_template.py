"""The charts of ``dvc plots show`` / ``dvc plots diff`` (template ``.dvc/plots/fold_lines.json``),
drawn by Vega as the plots page draws them (vl-convert bundles the same Vega as
``liverseg.plots_page``), for runs of 12 and 2 epochs: DVC passes the epochs as strings, so an
ordinal axis would read 1, 10, 11, 12, 2 … 9; a numeric one must not label epoch 1.5."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from conftest import REPO, run

# more than 9: string order and numeric order differ; 2: an axis with room for half epochs
RUNS = (12, 2)
FOLDS = ("fold-0", "fold-1")


def write_curves(path: Path, shift: float, n_epochs: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = ["fold,epoch,dice,iou,loss,val_dice,val_iou,val_loss"]
    for k, fold in enumerate(FOLDS):
        for e in range(1, n_epochs + 1):
            dice = 0.5 + e / 50 + k / 100 + shift
            rows.append(f"{fold},{e},{dice},{dice},{1 - dice},{dice},{dice},{1 - dice}")
    path.write_text("\n".join(rows) + "\n")


@pytest.fixture(scope="module", params=RUNS, ids=[f"{n}-epochs" for n in RUNS])
def plots_repo(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Path:
    """A repository with the project's dvc.yaml, params and template; curves of ``n`` epochs
    committed, and other curves in the workspace (a second revision for ``plots diff``)."""
    n = request.param
    repo = tmp_path_factory.mktemp(f"plots-{n}") / "repo"
    repo.mkdir()
    run(["git", "init", "-q"], repo)
    run(["dvc", "init", "-q"], repo)
    for name in ("dvc.yaml", "params.yaml", ".dvc/plots/fold_lines.json"):
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / name, repo / name)
    curves = repo / "reports/train/curves.csv"
    write_curves(curves, 0.0, n)
    run(["git", "add", "-A"], repo)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "curves"], repo)
    write_curves(curves, 0.05, n)
    return repo


def drawn_charts(repo: Path, cmd: list[str]) -> list[str]:
    """The SVG of each chart that ``dvc plots <cmd> --json`` specifies, drawn by Vega."""
    import vl_convert as vlc

    out = json.loads(run(["dvc", "plots", *cmd, "--json"], repo).stdout)
    assert not out.get("errors"), out["errors"]
    specs = [p["content"] for plots in out["data"].values() for p in plots]
    assert len(specs) == 2, out  # val_dice and val_loss
    return [vlc.vegalite_to_svg(spec) for spec in specs]


def axis_labels(svg: str, index: int) -> list[tuple[float, str]]:
    """(position, text) of the labels of the ``index``-th axis drawn (0: x, 1: y)."""
    groups = re.findall(r'role-axis-label"[^>]*>(.*?)</g>', svg)
    label = r'transform="translate\(([-\d.]+),[-\d.]+\)"[^>]*>([^<]*)</text>'
    return [(float(x), text) for x, text in re.findall(label, groups[index])]


@pytest.mark.parametrize("cmd", [["show"], ["diff", "HEAD"]], ids=["show", "diff"])
def test_epoch_axis_is_numeric_left_to_right(plots_repo: Path, cmd: list[str]) -> None:
    n_epochs = len((plots_repo / "reports/train/curves.csv").read_text().splitlines()) // 2
    for svg in drawn_charts(plots_repo, cmd):
        labels = [label for _, label in sorted(axis_labels(svg, 0)) if label]
        assert all(label.isdigit() for label in labels), labels  # whole epochs, no 2.5
        epochs = [int(label) for label in labels]
        # left to right in numeric order, each once (no 1.5 labelled "2"), within the run
        assert epochs == sorted(set(epochs)), labels
        assert 1 <= epochs[0] <= 2 and n_epochs - 1 <= epochs[-1] <= n_epochs, labels


def test_diff_legend_tells_the_revisions_apart(plots_repo: Path) -> None:
    for svg in drawn_charts(plots_repo, ["diff", "HEAD"]):
        legend = svg.split(">revision</text>")[0].rsplit('role-legend"', 1)[-1]
        symbols = re.findall(r'role-legend-symbol"[^>]*><path ([^>]*)/>', legend)
        assert len(symbols) == 2, legend[:2000]
        drawn = []
        for attrs in symbols:
            a = dict(re.findall(r'([\w-]+)="([^"]*)"', attrs))
            assert a.get("stroke") not in (None, "none", "transparent"), a  # a visible line
            assert a.get("fill") in (None, "none", "transparent"), a  # not a filled dot
            drawn.append((a["d"], a.get("stroke-dasharray")))
        assert drawn[0] != drawn[1], drawn
