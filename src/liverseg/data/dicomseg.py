"""DICOM Segmentation (SEG) output with highdicom: the liver mask on its source CT series.

The SEG references the source series and every source instance (one frame per CT slice that
holds liver; empty frames are omitted, as highdicom does by default), codes the segment as
SNOMED CT "Liver" (category "Organ"), and identifies the algorithm (name ``liverseg``, the
package version, and the model: its registered name and version when it came from the MLflow
registry). Viewers (3D Slicer, OHIF, a PACS) then show it on its CT.

A source series without FrameOfReferenceUID (the official 3D-IRCADb-01 series: their CT Image
IOD makes it mandatory, but GDCM wrote none) gets one, derived from its SeriesInstanceUID: the
same series always gets the same UID, as C.7.4.1.1.1 of the standard asks ("each Series shall
have a single Frame of Reference UID"). highdicom copies it from the source into the SEG; it is
given copies of the headers carrying it, so the files and :class:`DicomSeries` stay as read, and
the SEG still references every source instance by its SOPInstanceUID. See docs/dicom.md.

Array contract: ``mask_source`` is the mask on the series' source grid ``[i, j, k]`` =
(column, row, slice in ``DicomSeries.datasets`` order), see :mod:`liverseg.data.dicom`;
the tests read a SEG back into the same layout, so a round trip is the identity.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

import liverseg
from liverseg.errors import DataError
from liverseg.fsutil import atomic_file

ALGORITHM_NAME = "liverseg"
SEGMENT_LABEL = "Liver"
# A new series for the SEG: numbered far from the scanner's usual 1..99 so that it sorts last.
SERIES_NUMBER = 9901


def frame_of_reference_uid(series_uid: str) -> str:
    """The Frame of Reference UID given to a series that has none: a function of its UID."""
    return str(generate_uid(entropy_srcs=["liverseg frame of reference", str(series_uid)]))


def build_seg(
    mask_source: np.ndarray, source: Sequence[Dataset], *, model: str
) -> hd.seg.Segmentation:
    """The SEG data set of a 0/1 mask ``(columns, rows, slices)`` on the ``source`` slices;
    ``model`` says where the weights came from (e.g. ``liver-unet v3`` or a folder name)."""
    if mask_source.ndim != 3 or mask_source.shape[2] != len(source):
        raise DataError(
            f"mask of shape {mask_source.shape} does not match a series of {len(source)} slices"
        )
    rows, cols = int(source[0].Rows), int(source[0].Columns)
    if mask_source.shape[:2] != (cols, rows):
        raise DataError(
            f"mask of shape {mask_source.shape} does not match slices of {rows} rows x {cols} "
            "columns"
        )
    if not all("FrameOfReferenceUID" in ds for ds in source):
        # Copies of the slices without one get the series' (the one other slices carry; the
        # reader refuses a series whose slices carry different ones).
        present = [str(ds.FrameOfReferenceUID) for ds in source if "FrameOfReferenceUID" in ds]
        uid = min(present, default=frame_of_reference_uid(str(source[0].SeriesInstanceUID)))
        source = [copy.deepcopy(ds) for ds in source]
        for ds in source:
            ds.setdefault("FrameOfReferenceUID", uid)
            ds.setdefault("PositionReferenceIndicator", "")
    frames = np.ascontiguousarray(np.transpose(mask_source != 0, (2, 1, 0)))  # (k, row, col)
    description = hd.seg.SegmentDescription(
        segment_number=1,
        segment_label=SEGMENT_LABEL,
        segmented_property_category=codes.SCT.Organ,
        segmented_property_type=codes.SCT.Liver,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=hd.AlgorithmIdentificationSequence(
            name=ALGORITHM_NAME,
            family=codes.cid7162.ArtificialIntelligence,
            version=liverseg.__version__,
            parameters={"model": model},
        ),
    )
    try:
        return hd.seg.Segmentation(
            source_images=list(source),
            pixel_array=frames,
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=[description],
            series_instance_uid=hd.UID(),
            series_number=SERIES_NUMBER,
            sop_instance_uid=hd.UID(),
            instance_number=1,
            manufacturer=ALGORITHM_NAME,
            manufacturer_model_name=f"{ALGORITHM_NAME} 2D U-Net",
            software_versions=liverseg.__version__,
            device_serial_number="0",
            series_description=f"{SEGMENT_LABEL} ({ALGORITHM_NAME})",
        )
    except ValueError as exc:  # what highdicom refuses in the source headers, in one line
        reason = " ".join(str(exc).split())
        raise DataError(f"cannot build a DICOM SEG on this series: {reason}") from exc


def write_seg(
    mask_source: np.ndarray, source: Sequence[Dataset], path: Path, *, model: str
) -> Path:
    """Write the SEG of :func:`build_seg` to ``path`` (atomically)."""
    seg = build_seg(mask_source, source, model=model)
    with atomic_file(Path(path)) as tmp:
        seg.save_as(tmp)
    return Path(path)
