"""Inference time on one 512x512x129 CT: `liverseg predict`'s Segmenter against the notebook.

    python benchmarks/bench_predict.py [--model models] [--ct CT.nii.gz] [--repeat 2]

Side by side in one process, on the same volume:
  * liverseg: Segmenter.segment_ras with the trained model in ``--model`` (default
    ``models/`` from ``dvc repro``): window, resize to the model's size, batched predict,
    resize back, threshold, largest component, hole filling;
  * notebook: its inference path, a 256x256 U-Net of base 64 filters (depth 4), each slice
    resized with skimage and passed to ``model.predict`` one at a time, no post-processing.
    Its weights are random: only time is measured.
Also times the Segmenter under Keras' ``mixed_bfloat16`` policy and reports the Dice between
its mask and the float32 mask (equal masks = the cheaper arithmetic costs no quality).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
from skimage.transform import resize  # noqa: E402

from liverseg.data.phantom import generate_case  # noqa: E402
from liverseg.data.volumes import load_volume  # noqa: E402
from liverseg.evaluation.metrics import dice  # noqa: E402
from liverseg.inference import Segmenter  # noqa: E402
from liverseg.model.unet import build_unet, count_flops  # noqa: E402
from liverseg.params import ModelParams, PhantomParams  # noqa: E402


def notebook_predict(model: keras.Model, hu: np.ndarray) -> np.ndarray:
    out = np.empty(hu.shape, dtype=np.uint8)
    for k in range(hu.shape[2]):
        x = resize(hu[:, :, k], (256, 256), order=1, anti_aliasing=True, preserve_range=True)
        x = ((x - x.mean()) / (x.std() + 1e-6)).astype(np.float32)  # the notebook's z-score
        p = model.predict(x[None, ..., None], verbose=0)[0, ..., 0]
        out[:, :, k] = resize(p, hu.shape[:2], order=1) > 0.5
    return out


def timed(fn, repeat: int):
    best, out = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", type=Path, default=Path("models"))
    ap.add_argument("--ct", type=Path)
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args()
    if args.ct:
        hu, src = load_volume(args.ct).data, args.ct.name
    else:
        p = PhantomParams(n_cases=2, size=512, n_slices=129, spacing=(0.7, 0.7, 1.6), seed=1)
        hu, src = generate_case(0, p)[0], "phantom 512x512x129"
    print(f"volume: {src} {hu.shape}; best of {args.repeat}; keras {keras.__version__}\n")

    seg = Segmenter.from_dir(args.model)
    seg.segment_ras(hu[:, :, :8])  # warm-up: graph tracing is not inference time
    t_ours, mask32 = timed(lambda: seg.segment_ras(hu), args.repeat)
    gflop = count_flops(seg.model, seg.image_size) / 1e9

    nb = build_unet(256, ModelParams(depth=4, base_filters=64, dropout=0.0, batch_norm=True))
    notebook_predict(nb, hu[:, :, :2])
    t_nb, _ = timed(lambda: notebook_predict(nb, hu), 1)
    gflop_nb = count_flops(nb, 256) / 1e9

    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    seg16 = Segmenter.from_dir(args.model)
    seg16.segment_ras(hu[:, :, :8])
    t_bf16, mask16 = timed(lambda: seg16.segment_ras(hu), args.repeat)
    keras.mixed_precision.set_global_policy("float32")

    n = hu.shape[2]
    print("| path | model | GFLOP/slice | seconds | ms/slice | vs notebook |")
    print("|---|---|---|---|---|---|")
    print(
        f"| notebook (per-slice predict, 256x256) | base 64 | {gflop_nb:.1f} | {t_nb:.2f} |"
        f" {1000 * t_nb / n:.1f} | 1.0x |"
    )
    print(
        f"| liverseg Segmenter fp32 | {seg.image_size}px | {gflop:.2f} | {t_ours:.2f} |"
        f" {1000 * t_ours / n:.1f} | {t_nb / t_ours:.1f}x |"
    )
    print(
        f"| liverseg Segmenter mixed_bfloat16 | {seg.image_size}px | {gflop:.2f} | {t_bf16:.2f} |"
        f" {1000 * t_bf16 / n:.1f} | {t_nb / t_bf16:.1f}x |"
    )
    print(
        f"\nDice(bf16 mask, fp32 mask) = {dice(mask16, mask32):.5f}; liver voxels fp32 "
        f"{int(mask32.sum())}"
    )


if __name__ == "__main__":
    main()
