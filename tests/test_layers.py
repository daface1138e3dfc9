"""Imports run down: what segments a CT (inference, its post-processing) never imports the
evaluation package, whose stage-level code (liverseg.evaluation.holdout) runs the Segmenter.
Checked on the import closure (module level and inside functions) of test_dvc_deps."""

from __future__ import annotations

import pytest

from test_dvc_deps import SRC, closure


@pytest.mark.parametrize("module", ["liverseg.inference", "liverseg.postprocess"])
def test_segmenting_does_not_import_evaluation(module: str) -> None:
    evaluation = SRC / "liverseg" / "evaluation"
    up = sorted(str(f.relative_to(SRC)) for f in closure([module]) if evaluation in f.parents)
    assert not up, f"{module} imports the evaluation package, which imports it: {up}"
