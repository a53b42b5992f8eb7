"""The DICOM results of one segmented radiograph: the binary SEG and the TID 1500 SR that references it.

Built the same way by ``lungseg-edge`` and ``lungseg-segment --dicom-out`` (IHE AI Results: a SEG for
the mask, an SR Measurement Report for what is said about it, the model named in both).
"""

from __future__ import annotations

import warnings

from pydicom.dataset import Dataset

from lungseg import dicom_out
from lungseg.dicom_out import Provenance
from lungseg.inference import Segmentation
from lungseg.measurement import MaskMeasurement, sr_values
from lungseg.radiograph import Radiograph
from lungseg.sr_report import AlgorithmIdentity, build_measurement_report


def segmentation(reference: Dataset, segmentation: Segmentation, review: str, provenance: Provenance) -> Dataset:
    """The binary Segmentation of the native-size mask (its description says ``review`` when flagged);
    ``reference`` is the source without pixels (:func:`lungseg.dicom_out.reference_dataset`)."""
    with warnings.catch_warnings():  # pydicom/highdicom warnings quote patient data
        warnings.simplefilter("ignore")
        return dicom_out.build_seg(reference, segmentation.mask, provenance, review=review)


def measurement_report(reference: Dataset, radiograph: Radiograph, measured: MaskMeasurement, seg: Dataset,
                       provenance: Provenance) -> Dataset:
    """The TID 1500 Measurement Report: the areas and QA of ``seg``'s lung segment, the model as device."""
    identity = AlgorithmIdentity(name=provenance.model_name, version=provenance.model_version,
                                 bundle_sha256=provenance.bundle_sha256, device_uid=provenance.device_uid,
                                 software_version=provenance.software_version, manufacturer=dicom_out.MANUFACTURER)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return build_measurement_report(reference, seg, sr_values(radiograph, measured), identity,
                                        equipment=[provenance.equipment()])
