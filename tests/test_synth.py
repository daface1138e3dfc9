"""Synthetic CT from a label map (liverseg.data.synth), on a tiny map the tests draw themselves."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import yaml
from scipy import ndimage as ndi

from conftest import BIN, REPO, run, tool_env
from liverseg import stop
from liverseg.data import synth
from liverseg.data.labelmaps import LabelMap, load_labelmap
from liverseg.data.layout import find_nifti_pairs, output_paths
from liverseg.data.synth import synthesize, write_synth
from liverseg.data.volumes import load_case
from liverseg.params import SynthParams

MM = 4.0
SHAPE = (64, 64, 40)  # 256 x 256 x 160 mm
NAMES = ("skin", "liver", "livertumor01", "bone", "portalvein")
PARAMS = SynthParams(matrix=64)  # the smallest matrix: a fraction of a second per case
SEEDS = range(8)


def tiny_map(case_id: str = "e03", liver_shift_mm: float = 0.0) -> LabelMap:
    """A body ellipse (skin), a liver ellipsoid at the patient's right (small RAS x) in the
    middle slices (40 mm of body above and below it), a tumour in the liver, a spine, a
    portal vein tube."""
    x, y, z = np.meshgrid(*(np.arange(n) * MM for n in SHAPE), indexing="ij")
    cx, cy = SHAPE[0] * MM / 2, SHAPE[1] * MM / 2
    body = ((x - cx) / 100) ** 2 + ((y - cy) / 80) ** 2 <= 1
    lx, ly, lz = cx - 45 + liver_shift_mm, cy + 5, 80.0
    liver = ((x - lx) / 45) ** 2 + ((y - ly) / 50) ** 2 + ((z - lz) / 32) ** 2 <= 1
    tumour = (x - lx + 10) ** 2 + (y - ly) ** 2 + (z - lz) ** 2 <= 15**2
    bone = (x - cx) ** 2 + (y - cy + 55) ** 2 <= 14**2
    portal = ((x - lx - 15) ** 2 + (y - ly + 10) ** 2 <= 6**2) & (np.abs(z - lz) < 25)
    bits = np.zeros(SHAPE, np.uint32)
    for b, m in enumerate((body, liver, tumour, bone, portal)):
        bits[m] |= np.uint32(1 << b)
    affine = np.diag([MM, MM, MM, 1.0])
    affine[:3, 3] = (-128.0, -128.0, -80.0)
    return LabelMap(case_id, bits, (MM, MM, MM), affine, NAMES)


@pytest.fixture(scope="module")
def lm() -> LabelMap:
    return tiny_map()


def _run(lm: LabelMap, seed: int, **params) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    p = SynthParams(**{"matrix": 64, **params})
    return synthesize(lm, p, np.random.default_rng([seed, int(lm.case_id[1:])]))


def _centroid_mm(mask: np.ndarray, affine: np.ndarray) -> np.ndarray:
    return affine[:3, :3] @ np.argwhere(mask).mean(axis=0) + affine[:3, 3]


def test_same_seed_same_scan_other_seed_other_scan(lm: LabelMap) -> None:
    hu, mask, affine = _run(lm, 1)
    hu2, mask2, affine2 = _run(lm, 1)
    np.testing.assert_array_equal(hu, hu2)
    np.testing.assert_array_equal(mask, mask2)
    np.testing.assert_array_equal(affine, affine2)
    hu3, _, affine3 = _run(lm, 2)
    assert hu3.shape != hu.shape or not np.allclose(hu3, hu)
    assert not np.allclose(affine3, affine)


@pytest.mark.parametrize("seed", SEEDS)
def test_grid_within_params(lm: LabelMap, seed: int) -> None:
    hu, mask, affine = _run(lm, seed, pixel_mm=(0.6, 0.9), thickness_mm=(2.0, 4.0))
    assert hu.dtype == np.float32 and hu.ndim == 3
    assert hu.shape[:2] == (64, 64) and hu.shape[2] >= 8
    assert mask.shape == hu.shape
    pixel = np.diag(affine)[:3]
    # a 512-matrix pixel of 0.6-0.9 mm, written on 64 pixels over the same field of view
    assert 0.6 * 512 / 64 <= pixel[0] == pixel[1] <= 0.9 * 512 / 64
    assert 2.0 <= pixel[2] <= 4.0
    np.testing.assert_array_equal(affine[:3, :3], np.diag(pixel))  # RAS-aligned
    assert np.all(np.isfinite(hu)) and hu.min() >= -1024


@pytest.mark.parametrize("seed", SEEDS)
def test_mask_is_the_liver_resampled(lm: LabelMap, seed: int) -> None:
    _hu, mask, affine = _run(lm, seed, cut_prob=0.0)
    assert mask.dtype == np.uint8 and set(np.unique(mask).tolist()) == {0, 1}
    liver_ml = lm.mask("liver").sum() * MM**3 / 1000
    ml = mask.sum() * abs(np.linalg.det(affine[:3, :3])) / 1000
    # per-axis scale is within 8%: the volume within (0.92^3, 1.08^3), plus partial volume
    assert 0.75 * liver_ml <= ml <= 1.25 * liver_ml, (ml, liver_ml)
    # in the same place (scanner mm) up to the random rotation and deformation
    shift = _centroid_mm(mask, affine) - _centroid_mm(lm.mask("liver"), lm.affine)
    assert np.linalg.norm(shift) < 6.0, shift  # 2 mm at most over 50 seeds


@pytest.mark.parametrize("seed", SEEDS)
def test_cut_prob_one_cuts_the_liver(lm: LabelMap, seed: int) -> None:
    _hu, mask, _ = _run(lm, seed, cut_prob=1.0)
    slices = mask.any(axis=(0, 1))
    assert slices[0] or slices[-1]


@pytest.mark.parametrize("seed", SEEDS)
def test_cut_prob_zero_keeps_the_whole_liver(lm: LabelMap, seed: int) -> None:
    # the map has 40 mm of body above and below its liver: room for a margin both ends
    _hu, mask, _ = _run(lm, seed, cut_prob=0.0)
    slices = mask.any(axis=(0, 1))
    assert slices.any() and not slices[0] and not slices[-1], np.flatnonzero(slices)


def test_densities(lm: LabelMap) -> None:
    liver_lo = min(r["liver"][0] for r in synth._PHASES.values())
    liver_hi = max(r["liver"][1] for r in synth._PHASES.values())
    air_lo, air_hi = synth._FIXED["air"]
    medians = []
    for seed in SEEDS:
        hu, mask, _ = _run(lm, seed, cut_prob=0.0)
        # the liver away from its border (partial volume, blur) and most of it not lesion
        medians.append(float(np.median(hu[ndi.binary_erosion(mask)])))
        # the anterior rows of the field of view are outside the body (and above the table)
        assert air_lo - 15 <= np.median(hu[:, -2:, :]) <= air_hi + 15
    assert all(liver_lo - 15 <= m <= liver_hi + 15 for m in medians), medians
    assert max(medians) - min(medians) > 40, medians  # the contrast is drawn, not fixed


def save_map(lm: LabelMap, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"ircad_{lm.case_id}_labels.nii.gz"
    nib.save(nib.Nifti1Image(lm.bits, lm.affine), path)
    (folder / f"ircad_{lm.case_id}_labels.json").write_text(
        json.dumps({"structures": list(lm.structures)})
    )
    return path


def _arrays(out: Path, case_id: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    case = load_case(*output_paths(out, case_id), case_id=case_id)
    return case.image.data, case.mask.data, case.image.affine


def test_write_synth_pairs_load_and_do_not_depend_on_processes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    maps = tmp_path / "maps"
    save_map(tiny_map("e03"), maps)
    save_map(tiny_map("e05", liver_shift_mm=12.0), maps)
    assert load_labelmap(maps / "ircad_e05_labels.nii.gz").structures == NAMES
    assert write_synth(tmp_path / "a", PARAMS, maps) == ["e03", "e05"]
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == [
        "ircad_e03_liver.nii.gz",
        "ircad_e03_orig.nii.gz",
        "ircad_e05_liver.nii.gz",
        "ircad_e05_orig.nii.gz",
    ]
    monkeypatch.setattr(os, "cpu_count", lambda: 1)
    assert write_synth(tmp_path / "b", PARAMS, maps) == ["e03", "e05"]
    # a case is a function of (seed, patient) alone: alone in its folder, it comes out the same
    (maps / "ircad_e03_labels.nii.gz").unlink()
    assert write_synth(tmp_path / "c", PARAMS, maps) == ["e05"]
    for case_id in ("e03", "e05"):
        a = _arrays(tmp_path / "a", case_id)
        for other in ("b", "c") if case_id == "e05" else ("b",):
            for x, y in zip(a, _arrays(tmp_path / other, case_id), strict=True):
                np.testing.assert_array_equal(x, y)
    # two patients (or two seeds) are two scans
    assert not np.array_equal(_arrays(tmp_path / "a", "e03")[2], _arrays(tmp_path / "a", "e05")[2])
    write_synth(tmp_path / "d", SynthParams(matrix=64, seed=1), maps)
    assert not np.array_equal(_arrays(tmp_path / "c", "e05")[2], _arrays(tmp_path / "d", "e05")[2])
    # more draws: draw 0 is the scan of a one-draw data set, draw 1 another scan
    two = dataclasses.replace(PARAMS, draws=2)
    assert write_synth(tmp_path / "e", two, maps) == ["e05", "e05-1"]
    for x, y in zip(_arrays(tmp_path / "c", "e05"), _arrays(tmp_path / "e", "e05"), strict=True):
        np.testing.assert_array_equal(x, y)
    draw0, draw1 = _arrays(tmp_path / "e", "e05"), _arrays(tmp_path / "e", "e05-1")
    assert not np.array_equal(draw0[2], draw1[2]) and not np.array_equal(draw0[0], draw1[0])


def test_a_stop_drops_the_maps_not_started(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A stop asked before ``write_synth`` starts: no map is synthesized (the pool itself:
    test_faults.py, "data workers")."""
    maps = tmp_path / "maps"
    for n in range(2, 8):
        save_map(tiny_map(f"e{n:02d}"), maps)
    monkeypatch.setattr(os, "cpu_count", lambda: 1)
    out = tmp_path / "out"
    out.mkdir()
    stop.request(signal.SIGTERM)
    with pytest.raises(stop.Interrupted):
        write_synth(out, PARAMS, maps)
    assert list(out.iterdir()) == []


@pytest.mark.slow
def test_sigterm_stops_ingest_within_a_map(tmp_path: Path) -> None:
    """SIGTERM to ``liverseg ingest`` of the 16 committed maps: it stops after the maps in
    flight (not after every map), keeps neither output nor temporary, and says so in one line."""
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"ingest": {"synth": {"matrix": 64, "draws": 1}}}))
    cmd = [str(BIN / "liverseg"), "ingest", "--out", "raw", "--labelmaps", str(REPO / "labelmaps"),
           "--params", str(params)]  # fmt: skip
    proc = subprocess.Popen(
        cmd, cwd=tmp_path, env=tool_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert proc.stderr is not None
    first = proc.stderr.readline()  # the first map's progress line: 15 are still to come
    assert re.match(r"e\d\d: ", first), first
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    done = re.findall(r"^e\d\d: ", first + err, re.M)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert err.splitlines()[-1].startswith("liverseg ingest: interrupted by SIGTERM;"), err
    assert 1 <= len(done) <= 4, err  # two workers: at most what ends in half a second
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]


@pytest.mark.slow
def test_ingest_stage_on_two_committed_label_maps(tmp_path: Path) -> None:
    """``liverseg ingest`` of the default data set, offline, on two of the project's label maps."""
    maps = tmp_path / "labelmaps"
    maps.mkdir()
    for n in (4, 18):  # two of the smallest files
        for suffix in (".nii.gz", ".json"):
            shutil.copy(REPO / "labelmaps" / f"ircad_e{n:02d}_labels{suffix}", maps)
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"ingest": {"synth": {"matrix": 64, "cut_prob": 0.0}}}))
    out = tmp_path / "raw"
    proc = run(
        [str(BIN / "liverseg"), "ingest", "--out", str(out), "--labelmaps", str(maps),
         "--params", str(params)],
        tmp_path,
    )  # fmt: skip
    assert "ingest: 2 cases (synth)" in proc.stdout
    pairs = find_nifti_pairs(out)
    assert [p.case_id for p in pairs] == ["e04", "e18"]
    for p in pairs:
        case = load_case(p.image, p.mask, case_id=p.case_id)
        lm = load_labelmap(maps / f"ircad_{p.case_id}_labels.nii.gz")
        assert case.image.data.shape[:2] == (64, 64)
        liver_ml = lm.mask("liver").sum() * np.prod(lm.spacing) / 1000
        ml = case.mask.data.sum() * np.prod(case.image.spacing) / 1000
        assert 0.75 * liver_ml <= ml <= 1.25 * liver_ml, (p.case_id, ml, liver_ml)
        shift = _centroid_mm(case.mask.data, case.image.affine) - _centroid_mm(
            lm.mask("liver"), lm.affine
        )
        assert np.linalg.norm(shift) < 6.0, (p.case_id, shift)
        assert np.median(case.image.data[case.mask.data == 1]) > 0  # soft tissue, not air


def test_the_chest_is_lungs_above_the_dome_and_a_heart_beside_it(lm: LabelMap) -> None:
    masks = {n: lm.mask(n) for n in lm.structures}
    axes = tuple(lm.affine[a, 3] + MM * np.arange(n) for a, n in enumerate(SHAPE))
    liver, body = masks["liver"], masks["skin"]
    top = np.flatnonzero(liver.any(axis=(0, 1)))[-1]
    for seed in SEEDS:
        chest = synth._missing_organs(masks, np.random.default_rng(seed), axes)
        heart, thorax = chest["heart"], chest["thorax"]
        assert not (thorax & ~body).any() and not (heart & ~body).any()
        assert not (thorax & liver).any() and not (heart & liver).any()
        # lungs only above a plane at most 12 % of the liver's height below its dome
        low = np.flatnonzero(thorax.any(axis=(0, 1)))[0]
        assert top - 0.12 * (top - np.flatnonzero(liver.any(axis=(0, 1)))[0]) - 1 <= low
        # the map has no kidneys and no spleen: they are added, outside the liver, and the
        # spleen on the left (smaller RAS x), the right kidney on the right
        for organ in ("rightkidney", "leftkidney", "spleen"):
            assert chest[organ].any() and not (chest[organ] & liver).any(), organ
        assert np.argwhere(chest["spleen"]).mean(axis=0)[0] < SHAPE[0] / 2
        assert np.argwhere(chest["rightkidney"]).mean(axis=0)[0] > SHAPE[0] / 2
        # the heart sits above the liver's centre, at or left of the midline (RAS x grows
        # towards the patient's right)
        assert heart.any()
        hc, lc = np.argwhere(heart).mean(axis=0), np.argwhere(liver).mean(axis=0)
        assert hc[2] > lc[2] and hc[0] <= SHAPE[0] / 2 + 2, (hc, lc)  # clipped by the liver


@pytest.mark.parametrize("seed", SEEDS)
def test_past_the_maps_top_only_body_and_bone_go_on(seed: int) -> None:
    """A map whose liver reaches its last slice (as the IRCAD maps nearly do): the scan runs
    on past it into a chest of lungs, and never repeats the liver there."""
    full = tiny_map()
    lm = LabelMap("e03", full.bits[:, :, :26].copy(), full.spacing, full.affine, full.structures)
    hu, mask, affine = _run(lm, seed, cut_prob=0.0)
    map_top_mm = full.affine[2, 3] + MM * 25
    z_mm = affine[2, 3] + affine[2, 2] * np.arange(hu.shape[2])
    past = z_mm > map_top_mm + affine[2, 2] + 12  # clear of the deformation's reach
    assert past.any()
    assert not mask[:, :, past].any()
    chest = hu[:, :, past]
    assert ((chest > -960) & (chest < -700)).any()  # lung inside the body, not outside air
