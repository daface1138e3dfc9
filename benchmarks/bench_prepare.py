"""Time `prepare` on one 512x512x129 CT against the notebook's per-slice skimage resize.

    python benchmarks/bench_prepare.py [--ct CT.nii.gz --mask MASK.nii.gz] [--repeat 3]

Without --ct it uses a phantom case generated at 512x512x129 (0.7 x 0.7 x 1.6 mm), so the
benchmark runs on a fresh clone. Both methods resize every slice to the same size; the
notebook's is `skimage.transform.resize` (order 1, anti-aliased) in a Python loop over
slices, ours is `liverseg.data.slices.prepare_volume` (two matrix products per stack).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from skimage.transform import resize

from liverseg.data.phantom import generate_case
from liverseg.data.slices import prepare_volume, window
from liverseg.data.volumes import load_case
from liverseg.params import PhantomParams

WINDOW = (-100.0, 400.0)


def notebook_prepare(hu: np.ndarray, mask: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """The notebook's method (minus its uint8 bug): one skimage resize per slice."""
    imgs, masks = [], []
    for k in range(hu.shape[2]):
        imgs.append(
            resize(hu[:, :, k], (size, size), order=1, anti_aliasing=True, preserve_range=True)
        )
        masks.append(
            resize(mask[:, :, k], (size, size), order=0, anti_aliasing=False, preserve_range=True)
        )
    return window(np.stack(imgs).astype(np.float32), *WINDOW), np.stack(masks).astype(np.uint8)


def ours(hu: np.ndarray, mask: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    img, lab, _ = prepare_volume(
        hu,
        mask,
        window_hu=WINDOW,
        image_size=size,
        liver_free_fraction=1.0,
        rng=np.random.default_rng(0),
    )
    return img, lab


def best_of(fn, repeat: int) -> tuple[float, tuple[np.ndarray, np.ndarray]]:
    times, out = [], None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    assert out is not None
    return min(times), out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ct", type=Path)
    ap.add_argument("--mask", type=Path)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--sizes", type=int, nargs="+", default=[256, 96])
    args = ap.parse_args()
    if args.ct:
        case = load_case(args.ct, args.mask, case_id="bench")
        hu, mask, src = case.image.data, case.mask.data, str(args.ct.name)
    else:
        p = PhantomParams(n_cases=2, size=512, n_slices=129, spacing=(0.7, 0.7, 1.6), seed=0)
        hu, mask, _ = generate_case(0, p)
        src = "phantom 512x512x129"
    print(f"volume: {src}, shape {hu.shape}, best of {args.repeat}\n")
    print(
        "| output | notebook (per-slice skimage) | liverseg prepare | speed-up |"
        " mean abs diff | max abs diff | mask agreement |"
    )
    print("|---|---|---|---|---|---|---|")
    for size in args.sizes:
        t_nb, (img_nb, m_nb) = best_of(lambda s=size: notebook_prepare(hu, mask, s), args.repeat)
        t_us, (img_us, m_us) = best_of(lambda s=size: ours(hu, mask, s), args.repeat)
        diff = np.abs(img_nb - img_us)
        agree = float((m_nb == m_us).mean())
        print(
            f"| {size}x{size}x{hu.shape[2]} | {t_nb:.3f} s | {t_us:.3f} s | {t_nb / t_us:.1f}x |"
            f" {diff.mean():.4f} | {diff.max():.3f} | {agree:.4%} |"
        )


if __name__ == "__main__":
    main()
