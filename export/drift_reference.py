"""``lungseg-export --drift-reference MANIFEST``: the drift monitor's reference, shipped in the bundle.

The descriptors (:mod:`lungseg.drift`) of the training images are binned and written as
``drift_reference.json`` into the bundle, then ``bundle.json`` is rewritten so the file is hashed with the
rest. No torch: the lung fractions come from the manifest's ground-truth masks.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from lungseg.bundle import BUNDLE_MANIFEST, write_bundle_manifest
from lungseg.data import load_manifest
from lungseg.drift import REFERENCE_FILE, build_reference, record_rows

log = logging.getLogger("lungseg.export")


def add_drift_reference(bundle: Path, manifest: Path, max_images: int | None = None) -> dict[str, Any]:
    """Write ``bundle/drift_reference.json`` from the images of ``manifest`` (at most ``max_images``, evenly
    spread) and refresh ``bundle.json``; returns the reference's summary."""
    if not (bundle / BUNDLE_MANIFEST).is_file():
        raise FileNotFoundError(f"{bundle}: no {BUNDLE_MANIFEST} (not a model bundle)")
    records = load_manifest(manifest)
    if max_images is not None and 0 < max_images < len(records):
        step = len(records) / max_images
        records = [records[int(i * step)] for i in range(max_images)]
    reference = build_reference(record_rows(records), manifest.name)
    reference.write(bundle / REFERENCE_FILE)
    previous = json.loads((bundle / BUNDLE_MANIFEST).read_text())
    extra = {k: v for k, v in previous.items() if k not in ("schema", "files")}
    extra["drift_reference"] = {"images": reference.images, "source": reference.source,
                                "descriptors": sorted(reference.descriptors)}
    write_bundle_manifest(bundle, extra)
    log.info("drift reference: %d images, %d descriptors -> %s", reference.images, len(reference.descriptors),
             bundle / REFERENCE_FILE)
    return extra["drift_reference"]
