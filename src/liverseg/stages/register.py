"""`register` stage: log the model as an MLflow pyfunc, register it, move the aliases.

Reads evaluate's ``metrics.json`` and train's ``run.json``, calls
:func:`liverseg.registry.register_model` and writes ``reports/register/register.json``.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from liverseg.evaluation.results import read_test_metrics
from liverseg.fsutil import atomic_dir, write_json
from liverseg.inference import PostProcessing
from liverseg.params import EvaluateParams, RegisterParams, load_section
from liverseg.registry import decision_text, register_model
from liverseg.tracking import read_train_run


def register(
    model_dir: Path,
    evaluate_metrics: Path,
    train_run: Path,
    out: Path,
    cfg: RegisterParams,
    post: PostProcessing,
) -> dict[str, Any]:
    """Register the model; write ``out/register.json`` and return its content."""
    test = read_test_metrics(evaluate_metrics)
    link = read_train_run(train_run)
    result = register_model(
        model_dir, name=cfg.model_name, test=test, train_link=link, post=post, link_file=train_run
    )
    with atomic_dir(Path(out)) as tmp:
        write_json(tmp / "register.json", result)
    return result


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model-dir", type=Path, required=True, help="train's models/")
    parser.add_argument(
        "--evaluate", type=Path, required=True, help="evaluate's metrics.json (dice_mean)"
    )
    parser.add_argument("--train-run", type=Path, required=True, help="train's run.json")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))


def main(args: argparse.Namespace) -> None:
    cfg: RegisterParams = load_section("register", args.params)
    # The served model must post-process as the evaluated one did, or test_dice would not be
    # its Dice: the evaluate section's settings are logged with it.
    ev: EvaluateParams = load_section("evaluate", args.params)
    post = PostProcessing.from_params(ev)
    result = register(args.model_dir, args.evaluate, args.train_run, args.out, cfg, post)
    m = result["metrics"]
    before = (m["champion_version_before"], m["champion_dice_before"])
    print(
        f"register: {result['name']} v{result['version']}, "
        f"{decision_text(result['decision'], m['test_dice'], *before)} Serve with: "
        f"mlflow models serve -m {result['alias_uri']} --env-manager local"
    )
