"""A small, seeded, procedural abdominal CT with a liver mask: fast data for the tests.

Not the default data set (that is :mod:`liverseg.data.synth`); ``ingest.dataset: phantom``
still writes it. A body (fat, muscle wall, bowel) holds a liver, lesions inside it (in the
mask, as in 3D-IRCADb), and neighbours of liver-like density (spleen, kidneys, muscle,
bowel wall), so that no HU threshold segments the liver; spine and aorta are brighter.

Array contract (as :mod:`liverseg.data.volumes`): RAS, axes (x, y, z) = (towards Right,
Anterior, Superior), shape ``(size, size, n_slices)``; ``hu`` float32, ``mask`` uint8 0/1;
the affine is diagonal with ``params.spacing`` (mm), centred on the scanner origin. Anatomy is
placed in coordinates relative to the field of view (``u``, ``v`` in (-1, 1) across x and y,
``t`` in (0, 1) upwards), so it fills any grid; the liver lies at large x (patient's right),
anterior, and never reaches the top or bottom slices. Each case is a function of
``(params.seed, case_index)``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from liverseg.data.layout import case_id_for, output_paths
from liverseg.data.volumes import save_pair
from liverseg.params import PhantomParams

AIR, FAT, MUSCLE, BOWEL, BONE, AORTA, SPLEEN, KIDNEY, LIVER, LESION = range(10)
LIVER_T_RANGE = (0.15, 0.85)  # liver-free slices at both ends, as in a real abdominal scan


def _field(rng: np.random.Generator, shape: tuple[int, ...], ctrl: int) -> np.ndarray:
    """A smooth random field: ``ctrl`` x ``ctrl`` x ``ctrl // 2`` normal values, interpolated
    linearly, axis by axis (ndimage.zoom takes seconds on a 512 x 512 grid)."""
    coarse = rng.standard_normal((ctrl, ctrl, ctrl // 2)).astype(np.float32)
    w = [
        np.stack([np.interp(np.linspace(0, c - 1, n), np.arange(c), e) for e in np.eye(c)], 1)
        for n, c in zip(shape, coarse.shape, strict=True)
    ]
    return np.einsum("xa,yb,zc,abc->xyz", *w, coarse, optimize=True).astype(np.float32)


def generate_case(
    case_index: int, params: PhantomParams
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One case: ``(hu, mask, affine)``; cases differ in body size, organ sizes, positions
    and densities."""
    if case_index < 0:
        raise ValueError(f"case_index must be >= 0, got {case_index}")
    rng = np.random.default_rng([params.seed, case_index])
    n, nz = params.size, params.n_slices
    u = ((np.arange(n, dtype=np.float32) + 0.5) / n * 2 - 1).reshape(n, 1, 1)
    v = u.reshape(1, n, 1)
    t = ((np.arange(nz, dtype=np.float32) + 0.5) / nz).reshape(1, 1, nz)
    shape = (n, n, nz)

    def r(lo: float, hi: float) -> float:  # a Python float: keeps the arrays float32
        return float(rng.uniform(lo, hi))

    def ellipsoid(c: tuple[float, float, float], s: tuple[float, float, float]) -> np.ndarray:
        return ((u - c[0]) / s[0]) ** 2 + ((v - c[1]) / s[1]) ** 2 + ((t - c[2]) / s[2]) ** 2

    label = np.full(shape, AIR, dtype=np.uint8)

    def paint(where: np.ndarray, value: int) -> None:
        label[np.broadcast_to(where, shape)] = value

    a, b, v0 = r(0.75, 0.9), r(0.55, 0.72), r(-0.05, 0.05)
    rho = np.sqrt((u / a) ** 2 + ((v - v0) / b) ** 2)  # 1 on the skin
    cavity = rho < 1 - r(0.12, 0.22)
    paint(rho < 1, FAT)
    paint(rho < 1 - r(0.06, 0.12), MUSCLE)
    paint(cavity, FAT)
    paint(cavity & (np.abs(_field(rng, shape, 12)) < 0.3), BOWEL)

    k = r(0.85, 1.15)  # liver size
    centre = (r(0.35, 0.45) * a, v0 + r(-0.05, 0.05), r(0.45, 0.55))
    semi = (0.4 * k, 0.5 * b * k, 0.3 * k)
    left = ellipsoid((r(-0.05, 0.05), v0 + 0.5 * b, r(0.55, 0.65)), (0.4 * k, 0.25 * b, 0.17))
    blob = np.minimum(ellipsoid(centre, semi), left) + 0.2 * _field(rng, shape, 6)
    liver = cavity & (blob < 1) & (t > LIVER_T_RANGE[0]) & (t < LIVER_T_RANGE[1])
    paint(liver, LIVER)
    for _ in range(int(rng.integers(1, 4))):  # lesions in the right lobe
        c = [x + r(-0.5, 0.5) * s for x, s in zip(centre, semi, strict=True)]
        paint(liver & (ellipsoid((c[0], c[1], c[2]), (0.06, 0.06, 0.08)) < 1), LESION)
    # neighbours painted over the liver's ellipsoids: they are not liver
    paint(((u / 0.12) ** 2 + ((v - v0 + 0.6 * b) / 0.12) ** 2) < 1, BONE)
    paint(((u + 0.06) / 0.06) ** 2 + ((v - v0 + 0.38 * b) / 0.06) ** 2 < 1, AORTA)
    spleen = ellipsoid((-0.55 * a, v0 - 0.25 * b, r(0.5, 0.65)), (0.15, 0.3, r(0.15, 0.25)))
    paint(cavity & (spleen < 1), SPLEEN)
    for side in (1, -1):
        kidney = ellipsoid((side * 0.35 * a, v0 - 0.4 * b, r(0.3, 0.4)), (0.1, 0.16, 0.2))
        paint(cavity & (kidney < 1), KIDNEY)

    liver_hu = r(90, 125)
    densities = {
        AIR: -1000.0,
        FAT: r(-110, -80),
        MUSCLE: liver_hu - r(30, 45),
        BOWEL: liver_hu + r(-15, 10),
        BONE: r(300, 500),
        AORTA: liver_hu + r(80, 110),
        SPLEEN: liver_hu + r(-5, 15),
        KIDNEY: liver_hu + r(0, 40),
        LIVER: liver_hu,
        LESION: liver_hu - r(30, 50),
    }
    lut = np.array([densities[k] for k in range(len(densities))], dtype=np.float32)
    hu = lut[label] + r(10, 18) * rng.standard_normal(shape, dtype=np.float32)
    mask = np.isin(label, (LIVER, LESION)).astype(np.uint8)
    spacing = np.array(params.spacing, dtype=float)
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = -(np.array(shape) - 1) / 2 * spacing
    return hu, mask, affine


def write_phantom(out_dir: Path, params: PhantomParams) -> list[str]:
    """Write ``params.n_cases`` cases as IRCAD-style NIfTI pairs (:mod:`liverseg.data.layout`)
    into ``out_dir``; return the case ids."""
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    ids = [case_id_for(index + 1) for index in range(params.n_cases)]
    for index, case_id in enumerate(ids):
        save_pair(*generate_case(index, params), *output_paths(out_dir, case_id))
    return ids
