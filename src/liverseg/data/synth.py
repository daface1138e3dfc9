"""Synthetic CT from real anatomy: the project's offline default data set.

Each case is one patient's 3D-IRCADb-01 label map (:mod:`liverseg.data.labelmaps`) turned into
a CT scan of random geometry, contrast phase, densities, texture, resolution, field of view,
blur and noise, after SynthSeg's recipe (Billot et al., MedIA 2023), seeded by ``(seed,
patient number)``. The recipe step by step, and why: docs/data.md, "The synthetic CT".

The liver mask is the map's ``liver`` structure (lesions and intra-hepatic vessels included,
as in 3D-IRCADb), resampled with the CT (a slice's voxel is liver where most of its sub-slices
are). Arrays follow :mod:`liverseg.data.volumes`' RAS contract; the written affine is
diagonal (RAS-aligned).
"""

from __future__ import annotations

import logging
import os
import re
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from scipy import ndimage as ndi

from liverseg.data.labelmaps import LabelMap, find_labelmaps, load_labelmap
from liverseg.data.layout import case_id_for, output_paths
from liverseg.data.pool import map_in_processes
from liverseg.data.volumes import save_pair

if TYPE_CHECKING:
    from liverseg.params import SynthParams

__all__ = ["synthesize", "write_synth"]

log = logging.getLogger(__name__)

# Structure names of the IRCAD maps -> the tissue groups that get one density each.
_GROUPS: tuple[tuple[str, str], ...] = (
    ("liver", r"liver"),
    ("lesion", r"livertumou?r\d*|liverkyste?|livercyst\w*|metastasectomie|\w*tumou?r\w*"),
    ("portal", r"portalvein\d*"),
    ("vein", r"venoussystem|venacava|vein\w*"),
    ("artery", r"artery|aorta"),
    ("bone", r"bone"),
    ("kidney", r"kidneys?|leftkidney|rightkidney"),
    ("spleen", r"spleen"),
    ("lung", r"lungs?|leftlung|rightlung"),
    ("stomach", r"stomach"),
    ("gallbladder", r"gallbladder"),
    ("pancreas", r"pancreas"),
    ("adrenal", r"\w*surrenal\w*|\w*adrenal\w*"),
    ("fluid", r"biliarysystem|\w*kyst\w*|\w*cyst\w*"),
    ("dense", r"stones?|metal"),
    ("skin", r"skin"),
    ("heart", r"heart"),
    ("thorax", r"thorax"),
)
# Painting order: later groups cover earlier ones where structures overlap.
_ORDER = (
    "heart", "bone", "lung", "kidney", "spleen", "stomach", "pancreas", "adrenal", "gallbladder",
    "vein", "artery", "liver", "portal", "fluid", "lesion", "dense",
)  # fmt: skip

# Densities (HU, uniform draws) by contrast phase; lesions are drawn relative to the liver.
_PHASES: dict[str, dict[str, tuple[float, float]]] = {
    "non-contrast": {
        "liver": (40, 75), "spleen": (35, 60), "muscle": (35, 60), "portal": (25, 50),
        "vein": (25, 50), "artery": (25, 50), "kidney": (20, 45), "pancreas": (30, 50),
        "adrenal": (20, 45), "stomach": (10, 50),
    },
    "arterial": {
        "liver": (55, 95), "spleen": (70, 170), "muscle": (40, 65), "portal": (70, 170),
        "vein": (50, 130), "artery": (180, 420), "kidney": (120, 280), "pancreas": (80, 150),
        "adrenal": (40, 90), "stomach": (20, 90),
    },
    "portal-venous": {
        "liver": (85, 170), "spleen": (90, 150), "muscle": (45, 75), "portal": (130, 260),
        "vein": (110, 240), "artery": (120, 230), "kidney": (130, 240), "pancreas": (70, 130),
        "adrenal": (40, 90), "stomach": (20, 90),
    },
    "delayed": {
        "liver": (65, 110), "spleen": (65, 110), "muscle": (45, 70), "portal": (80, 140),
        "vein": (80, 140), "artery": (80, 140), "kidney": (90, 220), "pancreas": (55, 100),
        "adrenal": (40, 80), "stomach": (20, 80),
    },
}  # fmt: skip
_PHASE_P = {"non-contrast": 0.25, "arterial": 0.2, "portal-venous": 0.45, "delayed": 0.1}
_FIXED: dict[str, tuple[float, float]] = {
    "fat": (-125, -65),
    "bone": (220, 650),
    "lung": (-920, -760),
    "gallbladder": (-5, 30),
    "fluid": (-5, 35),
    "dense": (600, 1500),
    "air": (-1010, -980),
    "table": (-300, 450),
}
# Classes of the unlabelled interior's blobs: (HU range, weight).
_BLOBS: tuple[tuple[tuple[float, float], float], ...] = (
    ((-125, -60), 0.32),  # mesenteric / visceral fat
    ((10, 70), 0.3),  # bowel wall, muscle, unenhanced organs
    ((60, 200), 0.18),  # enhancing organs and bowel, heart, as dense as any liver
    ((-5, 35), 0.1),  # fluid-filled bowel, bladder
    ((-1000, -700), 0.1),  # gas, lung bases
)


def _group_of(name: str) -> str:
    for group, pattern in _GROUPS:
        if re.fullmatch(pattern, name.lower()):
            return group
    return "other"


def _u(rng: np.random.Generator, lo_hi: tuple[float, float]) -> float:
    return float(rng.uniform(*lo_hi))


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], sigma_vox) -> np.ndarray:
    """Zero-mean, unit-std Gaussian noise smoothed with ``sigma_vox`` (voxels per axis).

    A wide field is drawn on a grid ``f`` times coarser in-plane, repeated and smoothed again
    with ``f / 2``: the same look for a fraction of the filtering."""
    sigma = np.broadcast_to(np.asarray(sigma_vox, dtype=np.float64), (len(shape),))
    f = max(1, int(min(sigma[:2]) / 3))
    coarse = (-(-shape[0] // f), -(-shape[1] // f), *shape[2:])
    field = ndi.gaussian_filter(
        rng.standard_normal(coarse, dtype=np.float32), (sigma[0] / f, sigma[1] / f, *sigma[2:])
    )
    if f > 1:
        field = field.repeat(f, axis=0).repeat(f, axis=1)[: shape[0], : shape[1]]
        field = ndi.gaussian_filter(field, (f / 2, f / 2, *([0.0] * (len(shape) - 2))))
    field /= max(float(field[::3, ::3].std()), 1e-6)  # the std of a subsample is as good
    return field


def _rotation(rng: np.random.Generator) -> np.ndarray:
    def rot(axis: int, deg: float) -> np.ndarray:
        c, s = np.cos(np.radians(deg)), np.sin(np.radians(deg))
        i, j = [a for a in range(3) if a != axis]
        r = np.eye(3)
        r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
        return r

    return rot(2, rng.uniform(-10, 10)) @ rot(0, rng.uniform(-4, 4)) @ rot(1, rng.uniform(-4, 4))


def _extent(mask: np.ndarray, lm: LabelMap, axis: int, step: int) -> tuple[float, float]:
    """(low, high) RAS mm of ``mask`` (taken every ``step`` voxels in-plane) along ``axis``."""
    idx = np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axis)))
    scale = step if axis < 2 else 1
    ends = [lm.affine[axis, 3] + i * scale * lm.affine[axis, axis] for i in (idx[0], idx[-1])]
    return float(min(ends)), float(max(ends))


def _smooth_1d(rng: np.random.Generator, coords: np.ndarray, wavelength_mm: float) -> np.ndarray:
    """A smooth random curve over ``coords`` (mm), max |value| 1."""
    step = float(abs(coords[1] - coords[0])) if coords.size > 1 else 1.0
    curve = ndi.gaussian_filter1d(
        rng.standard_normal(coords.size), wavelength_mm / 4 / step, mode="reflect"
    )
    return (curve / max(float(np.abs(curve).max()), 1e-6)).astype(np.float32)


def synthesize(
    lm: LabelMap, params: SynthParams, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One synthetic CT of ``lm``'s anatomy: (HU float32, liver mask uint8, RAS affine)."""
    step = 4  # extents and centres are read off every 4th voxel in-plane: millimetres suffice
    small = lm.bits[::step, ::step]
    words = {n: np.uint32(1 << b) for b, n in enumerate(lm.structures)}
    body = (small & words["skin"]) != 0 if "skin" in words else small != 0
    liver_small = (small & words["liver"]) != 0
    (bx0, bx1), (by0, by1) = _extent(body, lm, 0, step), _extent(body, lm, 1, step)
    # A scan's field of view is set to hold the body: the pixel is drawn from the part of the
    # range whose 512-pixel field is at least as wide as this body.
    lo, hi = params.pixel_mm
    fit = max(bx1 - bx0, by1 - by0) / 512
    pixel = rng.uniform(min(max(lo, fit), hi), max(hi, fit)) * 512 / params.matrix
    thickness = _u(rng, params.thickness_mm)
    fov = pixel * params.matrix
    l0, l1 = _extent(liver_small, lm, 2, step)
    # Past the liver by more than the deformation below can move its ends (elastic <= 12 mm,
    # scale <= 8%, tilts <= 4 degrees over its half-width, half a slice), and on into the
    # chest or the pelvis, which the maps barely hold: past a map's ends only its body outline
    # and bones go on (repeated), and the chest is filled in below (heart, lungs).
    (lx0, lx1), (ly0, ly1) = _extent(liver_small, lm, 0, step), _extent(liver_small, lm, 1, step)
    pad = 12 + 0.09 * (l1 - l0) + 0.07 * (lx1 - lx0 + ly1 - ly0) / 2 + thickness / 2
    top, bottom = l1 + pad + rng.uniform(0, 80), l0 - pad - rng.uniform(0, 120)
    if rng.random() < params.cut_prob:
        # the liver cut by the first or the last slice, as a scan of a shorter range cuts it
        cut = rng.uniform(0.03, 0.3) * (l1 - l0)
        if rng.random() < 0.5:
            top = l1 - cut
        else:
            bottom = l0 + cut
    sub = int(np.clip(round(thickness / 1.6), 1, 3))  # sub-slices per slice: partial volume
    nx = ny = params.matrix
    nz = max(8, int((top - bottom) / thickness) + 1)
    nzs = nz * sub
    dz = thickness / sub
    origin = np.array(
        [(bx0 + bx1) / 2 - fov / 2, (by0 + by1) / 2 - fov / 2, bottom], dtype=np.float64
    )
    origin[:2] += rng.uniform(-0.08, 0.08, 2) * fov
    axes = (
        origin[0] + pixel * np.arange(nx, dtype=np.float32),
        origin[1] + pixel * np.arange(ny, dtype=np.float32),
        origin[2] + dz * (np.arange(nzs, dtype=np.float32) - (sub - 1) / 2),
    )
    # Output point p -> map point: centre + R S (p - centre) + elastic(p), then map voxels.
    # Every part is affine or separable, so each voxel coordinate is a sum of broadcast
    # 1-D terms (no (3, N) point arrays).
    ijk = np.argwhere(liver_small) * np.array([step, step, 1])
    centre = lm.affine[:3, :3] @ ijk.mean(axis=0) + lm.affine[:3, 3]
    lin = _rotation(rng) @ np.diag(rng.uniform(0.92, 1.08, 3))
    inv = np.linalg.inv(lm.affine)
    to_vox = inv[:3, :3] @ lin
    offset = inv[:3, :3] @ (centre - lin @ centre) + inv[:3, 3]
    amp = rng.uniform(0.0, 6.0)  # mm: a smooth displacement over ~10 cm, low rank
    # elastic[a] = sum of 2 separable terms; kept as factors: (x-y plane, z curve) pairs
    elastic = [
        [
            (
                np.outer(amp * _smooth_1d(rng, axes[0], 150), _smooth_1d(rng, axes[1], 150)),
                _smooth_1d(rng, axes[2], 150),
            )
            for _ in range(2)
        ]
        for _ in range(3)
    ]
    shape = (nx, ny, nzs)
    vox = np.empty((3, *shape), np.float32)
    planes = np.stack([plane.ravel() for terms in elastic for plane, _ in terms], axis=1)
    curves = np.stack([curve for terms in elastic for _, curve in terms])
    for i in range(3):
        # the six (plane x curve) terms at once: one matrix product
        weights = np.repeat(inv[i, :3], [len(terms) for terms in elastic]).astype(np.float32)
        vox[i] = ((planes * weights) @ curves).reshape(shape)
        vox[i] += offset[i]
        for a in range(3):
            term = to_vox[i, a] * axes[a]
            vox[i] += term.reshape([-1 if k == a else 1 for k in range(3)])
    # The map's first and last slices are repeated past its ends (a tilt must not cut the
    # body open); outside it in-plane is air.
    outside = (vox[2] < -0.5) | (vox[2] > lm.bits.shape[2] - 0.5)
    np.clip(vox[2], 0, lm.bits.shape[2] - 1, out=vox[2])
    bits = ndi.map_coordinates(lm.bits, vox, order=0, mode="constant", cval=0, prefilter=False)
    del vox
    bits[outside] &= sum((w for n, w in words.items() if n in ("skin", "bone")), np.uint32(0))
    masks = {name: (bits & w) != 0 for name, w in words.items()}
    masks.update(_missing_organs(masks, rng, axes))
    hu = _render(masks, rng, (pixel, pixel, dz), shape, sub)
    # Partial volume: a slice is the mean of its sub-slices; blur and noise come after.
    hu = hu.reshape(nx, ny, nz, sub).mean(axis=3)
    mask = (masks["liver"].reshape(nx, ny, nz, sub).mean(axis=3) >= 0.5).astype(np.uint8)
    hu = ndi.gaussian_filter(hu, (rng.uniform(0.2, 0.9),) * 2 + (0.0,))
    noise = _smooth_noise(rng, hu.shape, (rng.uniform(0.0, 0.8),) * 2 + (0.0,))
    hu += noise * rng.uniform(4.0, 28.0)
    np.clip(hu, -1024, 3071, out=hu)
    affine = np.diag([pixel, pixel, thickness, 1.0])
    affine[:3, 3] = origin
    return hu.astype(np.float32), mask, affine


def _missing_organs(
    masks: dict[str, np.ndarray], rng: np.random.Generator, axes: tuple[np.ndarray, ...]
) -> dict[str, np.ndarray]:
    """The liver's neighbours that a map does not label, where anatomy puts them, painted only
    on voxels no structure of the map holds (so the liver is never covered):

    * above the liver: the heart on the diaphragm, medial and anterior, as dense as the blood
      pool (as dense as a liver in the non-contrast phase), and lungs filling the chest
      around it above a plane near the liver's dome (``heart``, ``thorax``);
    * kidneys, posterior beside the spine at the level of the liver's lower part, and a
      spleen, posterior and lateral on the left at the level of its upper part, for maps that
      have none: the first synthetic models took IRCAD patient 1's right kidney for liver.

    RAS: x grows towards the patient's right, y towards anterior."""
    liver = masks["liver"]
    body = masks.get("skin", np.ones_like(liver))
    ks = np.flatnonzero(liver.any(axis=(0, 1)))
    if ks.size == 0:
        return {}
    labelled = np.zeros_like(liver)
    for name, m in masks.items():
        if name != "skin":
            labelled |= m
    free = body & ~labelled
    xs, ys, zs = axes
    bx = np.flatnonzero(body.any(axis=(1, 2)))
    by = np.flatnonzero(body.any(axis=(0, 2)))
    cx, back = xs[(bx[0] + bx[-1]) // 2], ys[by[0]]
    width, depth = xs[bx[-1]] - xs[bx[0]], ys[by[-1]] - ys[by[0]]
    z_low, z_top = zs[ks[0]], zs[ks[-1]]
    height = z_top - z_low

    def ellipsoid(centre: tuple[float, float, float], radii: np.ndarray) -> np.ndarray:
        return free & (
            ((xs - centre[0]) / radii[0])[:, None, None] ** 2
            + ((ys - centre[1]) / radii[1])[None, :, None] ** 2
            + ((zs - centre[2]) / radii[2])[None, None, :] ** 2
            <= 1
        )

    out: dict[str, np.ndarray] = {}
    radii = rng.uniform((45, 35, 40), (65, 55, 60))
    out["heart"] = ellipsoid(
        (
            cx - rng.uniform(0.0, 0.1) * width,  # left of the midline
            back + rng.uniform(0.5, 0.62) * depth,  # anterior
            z_top + rng.uniform(-0.2, 0.4) * radii[2],
        ),
        radii,
    )
    thorax = free & ~out["heart"]
    thorax[:, :, : int(np.ceil(ks[-1] - rng.uniform(0.0, 0.12) * ks.size))] = False
    out["thorax"] = thorax
    groups = {_group_of(name) for name in masks}
    if "kidney" not in groups:
        z_right = z_low + rng.uniform(0.0, 0.3) * height
        for side, name, dz in ((1, "rightkidney", 0.0), (-1, "leftkidney", rng.uniform(0, 30))):
            out[name] = (
                ellipsoid(
                    (
                        cx + side * rng.uniform(0.14, 0.24) * width,
                        back + rng.uniform(0.2, 0.32) * depth,
                        z_right + dz,
                    ),
                    rng.uniform((24, 20, 45), (34, 28, 60)),
                )
                & ~out["heart"]
            )
    if "spleen" not in groups:
        out["spleen"] = (
            ellipsoid(
                (
                    cx - rng.uniform(0.24, 0.34) * width,
                    back + rng.uniform(0.25, 0.4) * depth,
                    z_top - rng.uniform(0.15, 0.4) * height,
                ),
                rng.uniform((22, 35, 40), (35, 55, 65)),
            )
            & ~out["heart"]
        )
    return out


def _render(
    masks: dict[str, np.ndarray],
    rng: np.random.Generator,
    spacing: tuple[float, float, float],
    shape: tuple[int, int, int],
    sub: int,
) -> np.ndarray:
    """HU of every voxel: air and table outside the body, layers and blobs inside, then the
    labelled structures in anatomical order, each with its own density and texture."""
    phase = str(rng.choice(list(_PHASE_P), p=list(_PHASE_P.values())))
    dens = {g: _u(rng, r) for g, r in _PHASES[phase].items()}
    dens.update({g: _u(rng, r) for g, r in _FIXED.items()})
    dens["lesion"] = dens["liver"] + rng.uniform(-90, 40)
    dens["heart"] = dens["vein"] + rng.uniform(-30, 15)  # the blood pool
    dens["other"] = rng.uniform(-20, 150)
    groups: dict[str, np.ndarray] = {}
    for name, m in masks.items():
        g = _group_of(name)
        groups[g] = groups[g] | m if g in groups else m
    body = groups.get("skin", np.zeros(shape, bool))
    # Random fields are drawn on the slice grid and repeated over a slice's sub-slices (which
    # are averaged anyway): a third of the filtering.
    mm = np.array([spacing[0], spacing[1], spacing[2] * sub])
    thick = (shape[0], shape[1], shape[2] // sub)

    def field(sigma_mm: float) -> np.ndarray:
        return _smooth_noise(rng, thick, tuple(sigma_mm / mm))

    def full(a: np.ndarray) -> np.ndarray:
        return np.repeat(a, sub, axis=2)

    texture = full(field(rng.uniform(1.0, 4.0)))
    hu = np.full(shape, dens["air"], np.float32)
    # the table under the patient (posterior = small y), in most scans
    ys = np.flatnonzero(body.any(axis=(0, 2)))
    if ys.size and rng.random() < 0.8:
        gap = int(rng.uniform(5, 40) / spacing[1])
        rows = int(rng.uniform(5, 25) / spacing[1])
        hi = max(0, ys[0] - gap)
        hu[:, max(0, hi - rows) : hi, :] = dens["table"]
    # inside the body: subcutaneous fat, a muscle wall, then blobs of everything unlabelled
    # depth below the skin (mm), slice by slice
    depth = np.empty(thick, np.float32)
    for k in range(thick[2]):
        depth[..., k] = ndi.distance_transform_edt(body[:, :, k * sub + sub // 2], spacing[:2])
    depth = full(depth)
    fat_mm, muscle_mm = rng.uniform(4, 35), rng.uniform(5, 18)
    blob_mm = rng.uniform(6.0, 16.0)
    f1, f2 = field(blob_mm), field(blob_mm * 0.6)
    mix = f1 * 0.75 + f2 * 0.45
    cls = np.zeros(mix.shape, np.intp)  # np.digitize's classes, at a third of its time
    for edge in np.quantile(mix[::7, ::7], np.cumsum([w for _, w in _BLOBS])[:-1]):
        cls += mix >= edge
    levels = np.array([_u(rng, r) for r, _w in _BLOBS], np.float32)
    interior = full(levels[cls]) + texture * rng.uniform(2, 12)
    if "thorax" in groups:
        interior[groups["thorax"]] = dens["lung"] + texture[groups["thorax"]] * 20
    hu[body] = interior[body]
    muscle = dens["muscle"] + texture * rng.uniform(2, 10)
    wall = body & (depth > fat_mm) & (depth <= fat_mm + muscle_mm)
    hu[wall] = muscle[wall]
    fat = body & (depth <= fat_mm)
    hu[fat] = dens["fat"] + texture[fat] * rng.uniform(2, 10)
    for g in (*_ORDER, "other"):
        where = groups.get(g)
        if where is None or not where.any():
            continue
        tex = rng.uniform(3, 25) if g in ("bone", "lung") else rng.uniform(1, 12)
        hu[where] = dens[g] + texture[where] * tex
    return hu


def _one(path: Path, params: SynthParams, out_dir: Path) -> list[str]:
    lm = load_labelmap(path)
    number = int(lm.case_id[1:])
    cases = []
    for draw in range(params.draws):
        # draw 0 is seeded as before draws existed: a data set of one draw is unchanged
        rng = np.random.default_rng([params.seed, number, draw] if draw else [params.seed, number])
        hu, mask, affine = synthesize(lm, params, rng)
        case_id = case_id_for(number, draw)
        save_pair(hu, mask, affine, *output_paths(out_dir, case_id))
        log.info("%s: %s at %.2f x %.2f x %.2f mm", case_id, hu.shape, *np.diag(affine)[:3])
        cases.append(case_id)
    return cases


def write_synth(out_dir: Path, params: SynthParams, labelmaps: Path) -> list[str]:
    """``params.draws`` synthetic CTs + liver masks per label map in ``labelmaps`` (cases
    ``eNN``, ``eNN-1``, ...); returns the case ids.

    Label maps are processed in parallel (one process per CPU); each scan is a function of
    ``(params.seed, patient number, draw)`` alone, so the data set does not depend on the
    machine.
    """
    paths = find_labelmaps(labelmaps)
    cases: list[str] = []
    workers = max(1, min(len(paths), os.cpu_count() or 1))
    map_in_processes(partial(_one, params=params, out_dir=out_dir), paths, workers, cases.extend)
    return cases
