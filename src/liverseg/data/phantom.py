"""Seeded synthetic abdominal CT with liver masks: the project's offline default data set.

The phantom exists so that the whole pipeline (ingest -> register) runs without a download and
so that its tests have realistic data. It is built to be *hard in the same way* as real CT:
spleen, pancreas, kidney medulla, enhancing bowel wall, heart and muscle overlap the liver's HU
range, so no intensity threshold segments the liver (the best threshold interval scores a Dice
of about 0.6-0.7; on a real 3D-IRCADb scan it scores 0.70-0.77), and the liver's size, shape,
position and density vary by case and along z.

Array contract (same as :mod:`liverseg.data.volumes`): arrays are in canonical RAS order,
axes (x, y, z) = (towards the patient's Right, towards Anterior, towards Superior), shape
``(size, size, n_slices)``; ``hu`` is float32 in Hounsfield units, ``mask`` is uint8 0/1 (the
liver including its lesions and intra-hepatic vessels, as in 3D-IRCADb), and the affine is
diagonal with ``params.spacing`` (mm), centred on the volume. The liver lies at large x
(patient's right), anterior; the spleen at small x.

Geometry is defined in coordinates relative to the field of view (``u``, ``v`` in (-1, 1)
across x and y, ``t`` in (0, 1) from the bottom slice to the top), so that the anatomy fills
any ``size`` x ``n_slices`` grid; at the defaults (128 x 128 x 48 at 2.5 x 2.5 x 4 mm, a
320 x 320 x 192 mm field) the body is 25-30 cm wide and the liver about 0.7-2.2 litres.
The liver is confined to a middle range of ``t`` (under the diaphragm, above the bottom
slices), so every case has liver-free slices at both ends.

Each case is a deterministic function of ``(params.seed, case_index)``; the tissue densities
below are the model's anatomy (calibrated against a real 3D-IRCADb scan), not run parameters.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage as ndi

from liverseg.data.layout import case_id_for, output_paths
from liverseg.data.volumes import save_pair
from liverseg.errors import DataError
from liverseg.params import PhantomParams

# ------------------------------------------------------------------------------- tissue labels
# Painted into an int label volume in anatomical order (later organs cover earlier ones), then
# mapped to HU through a per-case lookup table.
AIR, TABLE, FAT, MUSCLE, VFAT, BOWEL, GAS, LUNG, HEART = range(9)
STOMACH_WALL, STOMACH_FLUID, SPLEEN, LIVER, LIVER_VESSEL, GALLBLADDER = range(9, 15)
KIDNEY_CORTEX, KIDNEY_MEDULLA, KIDNEY_SINUS, AORTA, IVC = range(15, 20)
CORTICAL, CANCELLOUS, DISC, CANAL, RIB, BOWEL_LUMEN, PANCREAS = range(20, 27)
LESION0 = 32  # lesion k has label LESION0 + k, each with its own density
MAX_LESIONS = 4
N_LABELS = LESION0 + MAX_LESIONS
LIVER_LABELS = (LIVER, LIVER_VESSEL, *range(LESION0, N_LABELS))

# Tissue densities (HU). Unenhanced tissues: (mean, +- half-range of the per-case draw).
_HU: dict[int, tuple[float, float]] = {
    AIR: (-1000.0, 0.0),
    TABLE: (350.0, 80.0),
    FAT: (-90.0, 10.0),
    VFAT: (-90.0, 10.0),
    BOWEL_LUMEN: (20.0, 10.0),
    GAS: (-950.0, 30.0),
    LUNG: (-850.0, 30.0),
    STOMACH_FLUID: (12.0, 6.0),
    LIVER: (108.0, 12.0),
    GALLBLADDER: (10.0, 6.0),
    KIDNEY_SINUS: (-40.0, 15.0),
    CORTICAL: (650.0, 60.0),
    CANCELLOUS: (200.0, 55.0),
    DISC: (85.0, 10.0),
    CANAL: (15.0, 5.0),
    RIB: (450.0, 60.0),
}
# Enhancing tissues: liver + U(lo, hi). One contrast bolus enhances them together, so their
# offsets from the liver vary less between patients than their absolute values; spleen,
# pancreas, kidney medulla, bowel wall and muscle overlap the liver's range, so no threshold
# separates the liver.
_HU_VS_LIVER: dict[int, tuple[float, float]] = {
    SPLEEN: (-5.0, 15.0),
    PANCREAS: (-20.0, 5.0),
    LIVER_VESSEL: (45.0, 75.0),  # portal-venous phase: vessels brighter than parenchyma
    MUSCLE: (-45.0, -30.0),
    HEART: (10.0, 35.0),
    BOWEL: (-15.0, 10.0),  # enhancing bowel wall
    STOMACH_WALL: (-35.0, -10.0),
    KIDNEY_MEDULLA: (-5.0, 15.0),
    KIDNEY_CORTEX: (50.0, 80.0),
    IVC: (20.0, 45.0),
    AORTA: (80.0, 110.0),
}
LESION_HU = (40.0, 60.0)
NOISE_STD_HU = (14.0, 18.0)  # per-case noise level (before the mild smoothing below)
NOISE_SMOOTH_VOX = (0.6, 0.6, 0.0)  # in-plane correlated CT noise
BLUR_VOX = (0.6, 0.6, 0.35)  # partial-volume blur of the noiseless image
TEXTURE_HU = 5.0  # slow intensity variation within tissues
HU_CLIP = (-1024.0, 3071.0)  # the range scanners store
LIVER_T_RANGE = (0.12, 0.9)  # the liver never reaches the top or bottom slices
DIAPHRAGM_T = 0.03  # thickness of the diaphragm's muscle sheet, in t


@dataclass(frozen=True)
class _Grid:
    """Broadcastable coordinates: u (X,1,1) towards Right, v (1,Y,1) Anterior, t (1,1,Z)."""

    u: np.ndarray
    v: np.ndarray
    t: np.ndarray
    kz: float  # one unit of t measured in units of u (for round lesions and vessels)
    ky: float  # one unit of v measured in units of u

    @property
    def shape(self) -> tuple[int, int, int]:
        """The (X, Y, Z) shape of the volume these coordinates span."""
        return (self.u.shape[0], self.v.shape[1], self.t.shape[2])

    def box(self, lo: tuple[float, float, float], hi: tuple[float, float, float]) -> _Box:
        """Index slices of the voxels whose coordinates lie in [lo, hi] (u, v, t)."""
        axes = (self.u.ravel(), self.v.ravel(), self.t.ravel())
        return tuple(
            slice(int(np.searchsorted(c, a, "left")), int(np.searchsorted(c, b, "right")))
            for c, a, b in zip(axes, lo, hi, strict=True)
        )  # type: ignore[return-value]

    def sub(self, box: _Box) -> _Grid:
        """The part of the grid inside ``box``: organs are computed there, not everywhere."""
        return _Grid(self.u[box[0]], self.v[:, box[1]], self.t[:, :, box[2]], self.kz, self.ky)

    def dist2(self, c: tuple[float, float, float]) -> np.ndarray:
        """Squared distance to the point ``c`` (u, v, t), in u units."""
        du, dv, dt = self.u - c[0], (self.v - c[1]) * self.ky, (self.t - c[2]) * self.kz
        return du * du + dv * dv + dt * dt


_Box = tuple[slice, slice, slice]


def _make_grid(params: PhantomParams) -> _Grid:
    """Voxel-centre coordinates relative to the field of view, so anatomy fits any grid."""
    nx, ny, nz = params.size, params.size, params.n_slices
    sx, sy, sz = params.spacing
    u = ((np.arange(nx, dtype=np.float32) + 0.5) / nx * 2 - 1).reshape(nx, 1, 1)
    v = ((np.arange(ny, dtype=np.float32) + 0.5) / ny * 2 - 1).reshape(1, ny, 1)
    t = ((np.arange(nz, dtype=np.float32) + 0.5) / nz).reshape(1, 1, nz)
    half_x = nx * sx / 2
    return _Grid(u, v, t, kz=nz * sz / half_x, ky=ny * sy / 2 / half_x)


def _smooth_field(
    rng: np.random.Generator, shape: tuple[int, int, int], ctrl: tuple[int, int, int]
) -> np.ndarray:
    """Smooth zero-mean, unit-std random field (float32): Gaussian-RBF interpolation of noise.

    Separable products over the coarse grid are much cheaper than filtering a full white-noise
    volume; ``ctrl`` sets the number of bumps along each axis.
    """
    weights = []
    for n, c in zip(shape, ctrl, strict=True):
        pos = np.linspace(0.0, c - 1.0, n, dtype=np.float32)
        w = np.exp(-0.5 * ((pos[:, None] - np.arange(c, dtype=np.float32)[None, :]) / 0.8) ** 2)
        weights.append(w / w.sum(axis=1, keepdims=True))
    wx, wy, wz = weights
    coarse = rng.standard_normal(ctrl).astype(np.float32)
    # einsum rather than BLAS: these small products pay more for BLAS threads than they gain
    out = np.einsum("xa,abc->xbc", wx, coarse)
    out = np.einsum("yb,xbc->xyc", wy, out)
    out = np.einsum("xyc,zc->xyz", out, wz)
    out -= out.mean()
    std = float(out.std())
    return out / np.float32(std if std > 0 else 1.0)


def _ellipsoid(
    g: _Grid,
    center: tuple[Any, Any, float],
    semi: tuple[float, float, float],
    angle: float = 0.0,
) -> np.ndarray:
    """Normalised squared radius of an ellipsoid turned by ``angle`` (rad) about the z axis.

    The centre's u and v may vary with t (arrays shaped (1,1,Z)): the organ drifts along z.
    """
    du, dv = g.u - center[0], g.v - center[1]
    if angle:
        c, s = float(np.cos(angle)), float(np.sin(angle))
        du, dv = c * du + s * dv, c * dv - s * du
    du, dv, dt = du / semi[0], dv / semi[1], (g.t - center[2]) / semi[2]
    return du * du + dv * dv + dt * dt


def _ellipsoid_box(
    g: _Grid, center: tuple[float, float, float], semi: tuple[float, float, float]
) -> _Box:
    """Bounding box of an ellipsoid at any in-plane angle."""
    r = max(semi[0], semi[1])
    return g.box(
        (center[0] - r, center[1] - r, center[2] - semi[2]),
        (center[0] + r, center[1] + r, center[2] + semi[2]),
    )


def _paint(label: np.ndarray, where: np.ndarray, value: int) -> None:
    """Set ``label`` to ``value`` where the (broadcastable) condition holds."""
    label[np.broadcast_to(where, label.shape)] = value


def _uniform(rng: np.random.Generator, lo: float, hi: float) -> float:
    """A Python float draw: NumPy scalars would silently promote float32 arrays to float64."""
    return float(rng.uniform(lo, hi))


def _segment_dist2(g: _Grid, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Squared distance (u units) of every voxel to the segment a-b (points in (u, v, t))."""
    scale = np.array([1.0, g.ky, g.kz], dtype=np.float32)
    a_s, b_s = a.astype(np.float32) * scale, b.astype(np.float32) * scale
    d = b_s - a_s
    length2 = float(d @ d) or 1.0
    pu, pv, pt = g.u - a_s[0], g.v * np.float32(g.ky) - a_s[1], g.t * np.float32(g.kz) - a_s[2]
    s = np.clip((pu * d[0] + pv * d[1] + pt * d[2]) / np.float32(length2), 0.0, 1.0)
    pu, pv, pt = pu - s * d[0], pv - s * d[1], pt - s * d[2]
    return pu * pu + pv * pv + pt * pt


def generate_case(
    case_index: int, params: PhantomParams
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Make one synthetic abdominal CT: ``(hu float32, mask uint8, affine)`` in RAS.

    Deterministic in ``(params.seed, case_index)``; different cases differ in body size, fat,
    organ densities and the liver's size, shape, z extent, position and lesions.
    """
    label, hu = _generate(case_index, params)
    mask = np.isin(label, LIVER_LABELS).astype(np.uint8)
    return hu, mask, phantom_affine(params)


def _generate(case_index: int, params: PhantomParams) -> tuple[np.ndarray, np.ndarray]:
    """The case's tissue label volume and its HU image (tests check tissues through it)."""
    if case_index < 0:
        raise ValueError(f"case_index must be >= 0, got {case_index}")
    rng = np.random.default_rng([params.seed, case_index])
    g = _make_grid(params)
    label = _anatomy(rng, g)
    return label, _render(rng, g, label)


@dataclass(frozen=True)
class _Body:
    """The case's body frame: outline, cavity and diaphragm, shared by every organ."""

    v0: float  # body centre (v)
    a0: float  # mean half-width (u)
    b0: float  # mean anterior half-depth (v)
    a: np.ndarray  # half-width along z, (1,1,Z)
    b: np.ndarray  # anterior half-depth along z, (1,1,Z)
    b_post: np.ndarray  # posterior half-depth along z (flatter back), (1,1,Z)
    rho: np.ndarray  # normalised radius: 1 on the skin
    fat_w: np.ndarray  # subcutaneous fat thickness in rho units
    inner: np.ndarray  # rho of the cavity's wall
    body: np.ndarray
    cavity: np.ndarray
    abdomen: np.ndarray  # cavity under the diaphragm
    thorax: np.ndarray  # cavity above it
    t_diaph: np.ndarray
    organ_scale: float  # liver size factor; the spleen follows it (hepatosplenomegaly)


def _anatomy(rng: np.random.Generator, g: _Grid) -> np.ndarray:
    """Paint the tissue label volume (uint8, shape ``g.shape``) of one case."""
    label = np.full(g.shape, AIR, dtype=np.uint8)
    body = _paint_body(rng, g, label)
    _paint_viscera(rng, g, body, label)
    tc = _paint_liver(rng, g, body, label)
    if rng.random() < 0.8:  # gallbladder (not liver in the mask); some patients have none
        gb_c = (0.28 * body.a0, body.v0 + 0.18 * body.b0, tc - 0.12)
        gb_semi = (0.06, 0.09, 0.08)
        box = _ellipsoid_box(g, gb_c, gb_semi)
        gb = _ellipsoid(g.sub(box), gb_c, gb_semi, 0.5) < 1
        _paint(label[box], body.abdomen[box] & gb, GALLBLADDER)
    _paint_skeleton_and_retroperitoneum(rng, g, body, label)
    _paint_liver_interior(rng, g, label)
    return label


def _paint_body(rng: np.random.Generator, g: _Grid, label: np.ndarray) -> _Body:
    """Table, skin outline, subcutaneous fat, muscle wall, and the diaphragm."""
    u, v, t = g.u, g.v, g.t
    # body outline: super-ellipse, flatter at the back (supine), size varying along z
    v0 = _uniform(rng, 0.02, 0.10)
    a0 = _uniform(rng, 0.78, 0.92)
    b0 = a0 * _uniform(rng, 0.72, 0.84)
    ph_a, ph_b = _uniform(rng, 0, 2 * np.pi), _uniform(rng, 0, 2 * np.pi)
    a = a0 * (1 + 0.04 * np.sin(2 * np.pi * 0.9 * t + ph_a) + 0.05 * (t - 0.5))
    b = b0 * (1 + 0.04 * np.sin(2 * np.pi * 0.7 * t + ph_b))
    b_post = np.float32(0.86) * b
    dv = v - v0
    front = dv > 0
    du_n = np.abs(u) / a
    dv_n = np.where(front, dv / b, -dv / b_post)
    # ellipse in front, a squarer super-ellipse (power 3) at the back
    du2, dv2 = du_n * du_n, dv_n * dv_n
    rho = np.where(front, np.sqrt(du2 + dv2), np.cbrt(du2 * du_n + dv2 * dv_n))
    sin_theta = np.where(front, dv_n, -dv_n) / np.maximum(np.hypot(du_n, dv_n), 1e-6)
    wobble = 0.02 * _smooth_field(rng, g.shape, (6, 6, 4))
    fat_w = _uniform(rng, 0.08, 0.18) * (0.7 + 0.3 * sin_theta) + wobble  # less fat at the back
    inner = 1 - fat_w - _uniform(rng, 0.06, 0.10)
    in_body = rho < 1
    cavity = rho < inner

    # table under the patient (posterior, dense), curved up at the sides, and its rail
    v_back = v0 - float(b_post.min())
    table_top = v_back - 0.015 + 0.06 * u * u
    _paint(label, (v <= table_top) & (v > table_top - 0.045) & (np.abs(u) < 0.8) & ~in_body, TABLE)
    rail = v_back - 0.13
    _paint(label, (v <= rail) & (v > rail - 0.015) & (np.abs(u) < 0.5), TABLE)
    _paint(label, in_body, FAT)
    _paint(label, in_body & (rho < 1 - fat_w), MUSCLE)
    _paint(label, cavity, VFAT)

    # diaphragm: two domes (right higher), lowest at the back and the sides; above it the
    # cavity is thorax, so the top of the liver is ringed by lung as in real CT
    d_right = _uniform(rng, 0.80, 0.86)
    d_left = d_right - _uniform(rng, 0.01, 0.05)
    dome_v = v0 - 0.05 * b0
    dv2 = ((v - dome_v) / b) ** 2
    t_diaph = np.maximum(
        d_right - 0.22 * (((u - 0.35 * a0) / a) ** 2 + dv2),
        d_left - 0.22 * (((u + 0.35 * a0) / a) ** 2 + dv2),
    ) - 0.05 * np.clip(-dv / b, 0, 1)
    thorax = cavity & (t > t_diaph)
    # the diaphragm itself: a muscle sheet capping the abdomen, hugging the liver's dome
    _paint(label, cavity & ~thorax & (t > t_diaph - DIAPHRAGM_T), MUSCLE)
    return _Body(
        v0, a0, b0, a, b, b_post, rho, fat_w, inner, in_body, cavity, cavity & ~thorax, thorax,
        t_diaph, _uniform(rng, 0.85, 1.15),
    )  # fmt: skip


def _paint_viscera(rng: np.random.Generator, g: _Grid, body: _Body, label: np.ndarray) -> None:
    """Bowel, lungs, heart, stomach, spleen and pancreas: the liver's look-alike neighbours."""
    v, t = g.v, g.t
    v0, a0, b0 = body.v0, body.a0, body.b0
    # bowel: worm-like loops along the zero set of a smooth random field: enhancing wall,
    # fluid lumen, gas pockets
    low = body.abdomen & (t < 0.7 - 0.25 * np.clip((v0 - v) / body.b, 0, 1))
    bowel_f = np.abs(_smooth_field(rng, g.shape, (22, 22, 10)))
    gas_f = _smooth_field(rng, g.shape, (16, 16, 8))
    bowel = low & (bowel_f < 0.75)
    lumen = bowel & (bowel_f < 0.3)
    _paint(label, bowel, BOWEL)
    _paint(label, lumen, BOWEL_LUMEN)
    _paint(label, lumen & (gas_f > 1.0), GAS)

    _paint(label, body.thorax, LUNG)
    h_c = (-0.1 * a0, v0 + 0.2 * b0, float(body.t_diaph.max()) + 0.1)
    h_semi = (0.46 * a0, 0.42 * b0, 0.3)
    box = _ellipsoid_box(g, h_c, h_semi)
    _paint(label[box], body.thorax[box] & (_ellipsoid(g.sub(box), h_c, h_semi) < 1), HEART)

    # stomach (left, anterior, upper) with an air-fluid level (gas rises anteriorly)
    st_c = (-0.30 * a0, v0 + 0.22 * b0, _uniform(rng, 0.56, 0.64))
    st_semi = (0.24 * a0, 0.22 * b0, 0.16)
    box = _ellipsoid_box(g, st_c, st_semi)
    st = _ellipsoid(g.sub(box), st_c, st_semi, angle=-0.4)
    abd, lab = body.abdomen[box], label[box]
    _paint(lab, abd & (st < 1), STOMACH_WALL)
    _paint(lab, abd & (st < 0.72), STOMACH_FLUID)
    level = st_c[1] + _uniform(rng, -0.02, 0.08)
    _paint(lab, abd & (st < 0.72) & (g.sub(box).v > level), GAS)

    # spleen (left, posterior-lateral, upper half of the liver's range)
    s_scale = body.organ_scale * _uniform(rng, 1.0, 1.35)
    sp_c = (-0.56 * a0, v0 - 0.28 * b0, _uniform(rng, 0.56, 0.66))
    sp_semi = (0.15 * a0 * s_scale, 0.33 * b0 * s_scale, 0.19 * s_scale)
    box = _ellipsoid_box(g, sp_c, sp_semi)
    sp = _ellipsoid(g.sub(box), sp_c, sp_semi, 0.6) < 1
    _paint(label[box], body.abdomen[box] & sp, SPLEEN)

    # pancreas: a tube from the head (right, by the duodenum) to the tail at the spleen
    pan_t = _uniform(rng, 0.40, 0.50)
    pan_v = v0 - 0.47 * b0 + 0.30
    head = np.array([0.15 * a0, pan_v + 0.02, pan_t - 0.05])
    tail = np.array([-0.45 * a0, pan_v - 0.05, pan_t + 0.07])
    radius = _uniform(rng, 0.045, 0.065)
    box = g.box(tuple(np.minimum(head, tail) - radius), tuple(np.maximum(head, tail) + radius))
    pancreas = _segment_dist2(g.sub(box), head, tail) < radius**2
    _paint(label[box], body.abdomen[box] & pancreas, PANCREAS)


def _paint_liver(rng: np.random.Generator, g: _Grid, body: _Body, label: np.ndarray) -> float:
    """Liver: a deformed union of three lobes drifting along z; returns its centre height t."""
    t = g.t
    v0, a0, b0 = body.v0, body.a0, body.b0
    tc = _uniform(rng, 0.48, 0.56)
    shear_u, shear_v = _uniform(rng, -0.15, 0.15), _uniform(rng, -0.15, 0.15)
    jit = rng.uniform(-0.05, 0.05, size=(3, 2)).tolist()
    sc = (rng.uniform(0.88, 1.12, size=(3, 3)) * body.organ_scale).tolist()
    drift_u, drift_v = shear_u * (t - tc), shear_v * (t - tc)
    right = _ellipsoid(
        g,
        ((0.45 + jit[0][0]) * a0 + drift_u, v0 + (jit[0][1] - 0.02) * b0 + drift_v, tc),
        (0.52 * a0 * sc[0][0], 0.75 * b0 * sc[0][1], 0.33 * sc[0][2]),
    )
    left = _ellipsoid(
        g,
        ((0.0 + jit[1][0]) * a0 + drift_u, v0 + (0.52 + jit[1][1]) * b0 + drift_v, tc + 0.12),
        (0.50 * a0 * sc[1][0], 0.26 * b0 * sc[1][1], 0.17 * sc[1][2]),
        angle=0.25,
    )
    tip = _ellipsoid(
        g,
        ((0.50 + jit[2][0]) * a0, v0 + (0.05 + jit[2][1]) * b0, tc - 0.20),
        (0.20 * a0 * sc[2][0], 0.32 * b0 * sc[2][1], 0.12 * sc[2][2]),
    )
    blob = np.minimum(np.minimum(right, left), tip)
    blob += 0.18 * _smooth_field(rng, g.shape, (7, 7, 5))
    in_range = (t > LIVER_T_RANGE[0]) & (t < LIVER_T_RANGE[1])
    _paint(label, body.abdomen & (blob < 1) & in_range, LIVER)
    return tc


def _paint_skeleton_and_retroperitoneum(
    rng: np.random.Generator, g: _Grid, body: _Body, label: np.ndarray
) -> None:
    """Vertebra, paraspinal and psoas muscles, aorta, IVC, kidneys and ribs."""
    u, v, t = g.u, g.v, g.t
    v0, a0, b0 = body.v0, body.a0, body.b0
    r_vb = 0.11 * a0 / 0.84
    v_vb = v0 - 0.55 * body.b_post
    v_canal = v_vb - r_vb - 0.055
    vb2 = (u / r_vb) ** 2 + ((v - v_vb) / r_vb) ** 2
    canal2 = (u / 0.05) ** 2 + ((v - v_canal) / 0.05) ** 2
    arch = (canal2 < 2.9) & (v < v_vb)
    in_wall = body.rho < 1 - body.fat_w
    spinous = (np.abs(u) < 0.025) & (v < v_canal) & in_wall
    transverse = (np.abs(v - v_canal - 0.01) < 0.025) & (np.abs(u) < 0.17)
    para = ((np.abs(u) - 0.14 * a0) / (0.15 * a0)) ** 2 + ((v - v_canal + 0.02) / 0.13) ** 2 < 1
    _paint(label, para & in_wall, MUSCLE)
    psoas_r = np.clip(0.1 * (0.5 - t) / 0.5, 0, None) + 0.005
    psoas = (np.abs(u) - r_vb - 0.05) ** 2 + (v - v_vb) ** 2 < psoas_r**2
    _paint(label, psoas & (t < 0.5) & body.cavity, MUSCLE)
    _paint(label, (arch | spinous | transverse) & body.body, CORTICAL)
    _paint(label, canal2 < 1, CANAL)
    disc = ((t / 0.16 + _uniform(rng, 0, 1)) % 1.0) < 0.22
    _paint(label, vb2 < 1, CORTICAL)
    _paint(label, vb2 < 0.72, CANCELLOUS)
    _paint(label, (vb2 < 1) & disc, DISC)

    ao_u = -0.06 * a0 + _uniform(rng, -0.02, 0.02)
    aorta = (u - ao_u) ** 2 + (v - (v_vb + r_vb + 0.08)) ** 2 < 0.068**2
    _paint(label, aorta & body.cavity, AORTA)
    ivc = ((u - 0.13 * a0) / 0.08) ** 2 + ((v - (v_vb + r_vb + 0.10)) / 0.055) ** 2 < 1
    _paint(label, ivc & body.cavity & (t < body.t_diaph + 0.04), IVC)

    for side, t_k in ((1.0, _uniform(rng, 0.28, 0.38)), (-1.0, _uniform(rng, 0.34, 0.44))):
        k_c = (side * (0.34 + _uniform(rng, -0.03, 0.03)) * a0, float(v_vb.mean()) + 0.04, t_k)
        k_semi = (0.095 * a0, 0.16 * b0 / 0.62, 0.25 * _uniform(rng, 0.9, 1.1))
        box = _ellipsoid_box(g, k_c, k_semi)
        gs, lab = g.sub(box), label[box]
        kid = _ellipsoid(gs, k_c, k_semi, angle=-side * 0.55)
        kidney = body.abdomen[box] & (kid < 1)
        _paint(lab, kidney, KIDNEY_CORTEX)
        _paint(lab, kidney & (kid < 0.6), KIDNEY_MEDULLA)
        _paint(lab, kidney & (kid < 0.35) & (side * (gs.u - k_c[0]) < -0.02), KIDNEY_SINUS)

    # ribs: oblique bone arcs in the body wall of the upper abdomen and thorax, descending
    # towards the front (phi: 0 at the spine, pi at the sternum)
    phi = np.abs(np.arctan2(u / body.a, (v0 - v) / body.b))
    rib_band = (body.rho > body.inner - 0.028) & (body.rho < body.inner + 0.006)
    on_rib = (((t + 0.2 * phi) / 0.16 + _uniform(rng, 0, 1)) % 1.0) < 0.25
    rib_zone = (t > 0.30 + 0.12 * phi / np.pi) & (phi > 0.3) & (phi < 2.75)
    _paint(label, rib_band & on_rib & rib_zone, RIB)


def _paint_liver_interior(rng: np.random.Generator, g: _Grid, label: np.ndarray) -> None:
    """Intra-hepatic vessels and darker lesions, both part of the liver mask (as in IRCAD)."""
    liver = label == LIVER
    if not liver.any():
        return
    box = tuple(
        slice(int(idx[0]), int(idx[-1]) + 1)
        for idx in (np.flatnonzero(liver.any(axis=other)) for other in ((1, 2), (0, 2), (0, 1)))
    )
    gs, lab, liv = g.sub(box), label[box], liver[box]  # type: ignore[arg-type]
    i, j, k = np.nonzero(liv)
    points = np.stack([gs.u.ravel()[i], gs.v.ravel()[j], gs.t.ravel()[k]], axis=1)
    hilum = points.mean(axis=0) + np.array([-0.08, -0.02, -0.02], dtype=np.float32)
    for n in range(int(rng.integers(3, 6))):
        target = points[rng.integers(len(points))]
        radius = 0.03 if n < 2 else 0.02
        _paint(lab, liv & (_segment_dist2(gs, hilum, target) < radius**2), LIVER_VESSEL)
    for n in range(int(rng.integers(1, MAX_LESIONS + 1))):
        c = points[rng.integers(len(points))]
        r = _uniform(rng, 0.025, 0.08)
        lesion = gs.dist2((float(c[0]), float(c[1]), float(c[2]))) < r * r
        _paint(lab, liv & lesion, LESION0 + n)


def _render(rng: np.random.Generator, g: _Grid, label: np.ndarray) -> np.ndarray:
    """Turn labels into HU: per-case densities, texture, partial-volume blur, CT noise."""
    lut = np.zeros(256, dtype=np.float32)
    for lab, (mean, half) in _HU.items():
        lut[lab] = mean + _uniform(rng, -half, half)
    for lab, (lo, hi) in _HU_VS_LIVER.items():
        lut[lab] = lut[LIVER] + _uniform(rng, lo, hi)
    lut[LESION0:N_LABELS] = rng.uniform(*LESION_HU, size=MAX_LESIONS)
    hu = lut[label]
    hu += (TEXTURE_HU * _smooth_field(rng, g.shape, (10, 10, 6))) * (label != AIR)
    hu = ndi.gaussian_filter(hu, BLUR_VOX, mode="nearest")
    noise = ndi.gaussian_filter(rng.standard_normal(g.shape, dtype=np.float32), NOISE_SMOOTH_VOX)
    noise *= np.float32(_uniform(rng, *NOISE_STD_HU) / max(float(noise.std()), 1e-6))
    hu += noise
    return np.clip(hu, *HU_CLIP).astype(np.float32, copy=False)


def phantom_affine(params: PhantomParams) -> np.ndarray:
    """Diagonal RAS affine with ``params.spacing``, the volume centred on the scanner origin."""
    shape = np.array([params.size, params.size, params.n_slices], dtype=float)
    spacing = np.array(params.spacing, dtype=float)
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = -(shape - 1) / 2 * spacing
    return affine


def write_phantom(out_dir: Path, params: PhantomParams) -> list[str]:
    """Write ``params.n_cases`` phantom cases as IRCAD-style NIfTI pairs; return the case ids.

    Files are ``ircad_eNN_orig.nii.gz`` (int16 HU) and ``ircad_eNN_liver.nii.gz`` (uint8 0/1),
    each written atomically; the caller wraps ``out_dir`` in :func:`liverseg.fsutil.atomic_dir`
    when the whole set must appear at once.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise DataError(f"{out_dir}: phantom output folder exists and is not a folder")
    out_dir.mkdir(parents=True, exist_ok=True)
    ids = []
    for index in range(params.n_cases):
        case_id = case_id_for(index + 1)
        hu, mask, affine = generate_case(index, params)
        image_path, mask_path = output_paths(out_dir, case_id)
        save_pair(hu, mask, affine, image_path, mask_path)
        ids.append(case_id)
    return ids
