"""A scan's one step from CT to outputs, shared by ``liverseg predict`` and the served model:
segment, write the mask (NIfTI, or DICOM SEG of the series), report its quality."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from liverseg.data.volumes import Volume, from_canonical, save_mask_like, save_probabilities_like
from liverseg.evaluation.quality import quality_report

if TYPE_CHECKING:
    from liverseg.data.dicom import DicomSeries
    from liverseg.inference import Segmenter


def segment_volume(
    seg: Segmenter,
    volume: Volume,
    output: Path,
    *,
    series: DicomSeries | None = None,
    model_name: str = "",
    probabilities: Path | None = None,
    progress: Callable[[int], object] | None = None,
) -> dict[str, Any]:
    """Segment ``volume``, write its mask to ``output`` (a DICOM SEG of ``series`` if given,
    else NIfTI) and the probability map if asked; ``liver_volume_ml``, ``liver_voxels`` and
    the quality report. The one step of ``liverseg predict`` and the served model."""
    pred = seg.predict_ras(
        volume.data,
        progress,
        probabilities=probabilities is not None,
        members=True,
        slice_mm=volume.spacing[2],
    )
    mask = seg.postprocess(pred.mask)
    if series is not None:
        from liverseg.data.dicomseg import write_seg  # highdicom: only when a SEG is written

        write_seg(from_canonical(mask, volume), series.datasets, output, model=model_name)
    else:
        save_mask_like(mask, volume, output)
    if probabilities is not None:
        assert pred.probabilities is not None
        save_probabilities_like(pred.probabilities, volume, probabilities)
    voxels = int(np.count_nonzero(mask))
    return {
        "liver_volume_ml": voxels * volume.voxel_volume_ml,
        "liver_voxels": voxels,
        "quality": quality_report(mask, volume.data, volume.spacing, member_masks=pred.members),
    }
