"""Patient-level data splits: a held-out test set of whole patients plus k folds over the rest.

A slice never crosses a split: every split is a list of case ids, never of slices, and the
cases of one patient (a synthetic data set's draws of one anatomy) are always in one split.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from sklearn.model_selection import GroupKFold

from liverseg.data.layout import patient_of
from liverseg.errors import DataError


def make_splits(
    slice_counts: dict[str, int],
    *,
    n_test: int,
    k_folds: int,
    seed: int,
    test_cases: tuple[str, ...] = (),
) -> dict[str, Any]:
    """Split case ids into ``test`` (the cases of n_test patients) and ``folds`` (k lists).

    The test patients are ``test_cases`` plus a seeded draw of the others; the folds come from
    scikit-learn's ``GroupKFold`` (shuffled, seeded) over the slices grouped by patient, which
    balances the number of slices per fold while keeping each patient in exactly one fold.
    """
    cases = sorted(slice_counts)
    patients = sorted({patient_of(c) for c in cases})
    if len(patients) < n_test + k_folds:
        raise DataError(
            f"need at least n_test + k_folds = {n_test + k_folds} patients, have {len(patients)}"
        )
    missing = sorted(set(test_cases) - set(patients))
    if missing:
        raise DataError(f"prepare.test_cases: {', '.join(missing)} not in the data set")
    if len(set(test_cases)) != len(test_cases) or len(test_cases) > n_test:
        raise DataError(f"prepare.test_cases: {list(test_cases)}: at most {n_test} distinct cases")
    rng = np.random.default_rng(seed)
    others = [p for p in patients if p not in test_cases]
    drawn = rng.choice(others, size=n_test - len(test_cases), replace=False).tolist()
    test_patients = {*test_cases, *drawn}
    test = [c for c in cases if patient_of(c) in test_patients]
    rest = [c for c in cases if c not in test]
    sizes = [max(1, slice_counts[c]) for c in rest]
    slice_case = np.repeat(rest, sizes)
    groups = np.repeat([patient_of(c) for c in rest], sizes)
    gkf = GroupKFold(n_splits=k_folds, shuffle=True, random_state=seed)
    folds = [
        sorted(np.unique(slice_case[val_idx]).tolist())
        for _, val_idx in gkf.split(np.zeros(len(groups)), groups=groups)
    ]
    return {"seed": seed, "n_test": n_test, "k_folds": k_folds, "test": test, "folds": folds}


def fold_cases(splits: dict[str, Any], fold: int) -> tuple[list[str], list[str]]:
    """(train case ids, validation case ids) of fold ``fold``."""
    folds = splits["folds"]
    if not 0 <= fold < len(folds):
        raise ValueError(f"fold {fold} out of range: there are {len(folds)} folds")
    val = list(folds[fold])
    train = sorted(c for i, f in enumerate(folds) if i != fold for c in f)
    return train, val


def trainval_cases(splits: dict[str, Any]) -> list[str]:
    """All non-test case ids (what the final model trains on)."""
    return sorted(c for f in splits["folds"] for c in f)
