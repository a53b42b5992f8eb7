"""Model identity (lungseg.provenance): one version per bundle, a Device UID that changes with the bundle."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from pydicom.uid import UID

from lungseg.bundle import BUNDLE_MANIFEST, default_bundle_dir, resolve_bundle, sha256_file, write_bundle_manifest
from lungseg.errors import LungsegError
from lungseg.provenance import ModelIdentity, ProvenanceError, derived_uid, model_identity

SHIPPED = default_bundle_dir()


def _valid_uid(value: str) -> bool:
    return UID(value).is_valid and len(value) <= 64


def _small_bundle(tmp_path: Path, extra: dict | None = None) -> Path:
    """A bundle folder with the shipped model.onnx and shape model, and its own bundle.json."""
    dest = tmp_path / "bundle"
    dest.mkdir()
    for name in ("model.onnx", "shape_model.npz"):
        shutil.copyfile(SHIPPED / name, dest / name)
    write_bundle_manifest(dest, extra)
    return dest


def _extra(root: Path) -> dict:
    """bundle.json's fields other than the file list (what a rewrite keeps)."""
    return {k: v for k, v in json.loads((root / BUNDLE_MANIFEST).read_text()).items() if k not in ("schema", "files")}


@pytest.fixture(scope="module")
def shipped() -> ModelIdentity:
    return model_identity(SHIPPED, backend="cpu", precision="fp32", threshold=0.5)


def test_the_shipped_identity_comes_from_its_bundle(shipped: ModelIdentity) -> None:
    bundle = resolve_bundle(SHIPPED)
    manifest = json.loads((SHIPPED / BUNDLE_MANIFEST).read_text())
    expected_source = "bundle.json" if manifest.get("model_version") else "onnx metadata"
    assert shipped.version_source == expected_source
    assert shipped.model_version == (manifest.get("model_version") or bundle.metadata["model_version"])
    assert shipped.model_name == bundle.metadata["model_name"]
    assert shipped.bundle_sha256 == bundle.sha256
    assert shipped.model_file == "model.onnx"
    assert shipped.model_sha256 == manifest["files"]["model.onnx"]["sha256"] == sha256_file(SHIPPED / "model.onnx")
    assert shipped.device_uid.startswith("2.25.") and _valid_uid(shipped.device_uid)
    assert (shipped.backend, shipped.precision, shipped.threshold) == ("cpu", "fp32", 0.5)


def test_bundle_json_version_wins_over_the_onnx_metadata(tmp_path: Path) -> None:
    root = _small_bundle(tmp_path, {"model_version": "0.2.0", "model_name": "lungseg-unet-v2"})
    identity = model_identity(root)
    assert (identity.model_version, identity.version_source) == ("0.2.0", "bundle.json")
    assert identity.model_name == "lungseg-unet-v2"
    assert identity.label == "lungseg-unet-v2 0.2.0"


def test_a_changed_file_changes_the_device_uid_but_not_the_version(tmp_path: Path) -> None:
    root = _small_bundle(tmp_path, {"model_version": "0.2.0"})
    before = model_identity(root)
    shape = root / "shape_model.npz"
    data = bytearray(shape.read_bytes())
    data[-1] ^= 1
    shape.write_bytes(bytes(data))
    write_bundle_manifest(root, _extra(root))
    after = model_identity(root)
    assert after.model_version == before.model_version == "0.2.0"
    assert after.model_sha256 == before.model_sha256  # the ONNX file itself is unchanged
    assert after.bundle_sha256 != before.bundle_sha256
    assert after.device_uid != before.device_uid
    assert _valid_uid(before.device_uid) and _valid_uid(after.device_uid)
    assert model_identity(root).device_uid == after.device_uid  # deterministic


def test_a_version_label_alone_does_not_change_the_device_uid(tmp_path: Path) -> None:
    """The Device UID identifies the files; bundle.json's descriptive fields are not part of it."""
    root = _small_bundle(tmp_path, {"model_version": "0.2.0"})
    before = model_identity(root)
    write_bundle_manifest(root, {"model_version": "0.2.1"})
    after = model_identity(root)
    assert after.model_version == "0.2.1" and after.device_uid == before.device_uid


def test_an_onnx_file_that_differs_from_bundle_json_is_refused(tmp_path: Path) -> None:
    root = _small_bundle(tmp_path)
    manifest = json.loads((root / BUNDLE_MANIFEST).read_text())
    manifest["files"]["model.onnx"]["sha256"] = "0" * 64
    (root / BUNDLE_MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ProvenanceError, match=r"model\.onnx") as caught:
        model_identity(root)
    assert isinstance(caught.value, LungsegError) and isinstance(caught.value, ValueError)


def test_a_bare_onnx_file_is_its_own_bundle(tmp_path: Path) -> None:
    path = tmp_path / "alone" / "model.onnx"
    path.parent.mkdir()
    shutil.copyfile(SHIPPED / "model.onnx", path)
    identity = model_identity(path)
    assert identity.bundle_sha256 == identity.model_sha256 == sha256_file(path)
    assert identity.version_source == "onnx metadata"


def test_the_contributing_equipment_item_names_the_model_as_a_device(shipped: ModelIdentity) -> None:
    item = shipped.contributing_equipment(application="lungseg-edge")
    assert item.DeviceUID == shipped.device_uid
    assert item.Manufacturer == "lungseg"
    assert item.ManufacturerModelName == f"lungseg-edge {shipped.model_name}"
    assert list(item.SoftwareVersions) == [shipped.software_version, shipped.label]
    purpose = item.PurposeOfReferenceCodeSequence[0]
    assert (purpose.CodeValue, purpose.CodingSchemeDesignator, purpose.CodeMeaning) == (
        "109102", "DCM", "Processing Equipment")
    for text in (shipped.bundle_sha256, shipped.model_sha256, shipped.device_uid, shipped.label):
        assert text in item.ContributionDescription
    assert _valid_uid(item.DeviceUID)
    assert len(item.ContributionDescription) <= 1024 and all(len(v) <= 64 for v in item.SoftwareVersions)


def test_algorithm_identifications_carry_name_version_and_hashes(shipped: ModelIdentity) -> None:
    texts: dict[str, list[str]] = {}
    for item in shipped.sr_algorithm():
        texts.setdefault(str(item.ConceptNameCodeSequence[0].CodeValue), []).append(str(item.TextValue))
    assert texts["111001"] == [shipped.model_name] and texts["111003"] == [shipped.model_version]
    assert f"bundle_sha256={shipped.bundle_sha256}" in texts["111002"]
    assert f"device_uid={shipped.device_uid}" in texts["111002"]
    seg_item = shipped.seg_algorithm()[0]
    assert seg_item.AlgorithmName == shipped.model_name and seg_item.AlgorithmVersion == shipped.model_version


def test_another_backend_is_the_same_device(shipped: ModelIdentity) -> None:
    other = shipped.with_runtime(backend="tensorrt", precision="fp16")
    assert (other.backend, other.precision, other.threshold) == ("tensorrt", "fp16", 0.5)
    assert other.device_uid == shipped.device_uid and other.label == shipped.label
    assert json.loads(json.dumps(other.to_dict()))["device_uid"] == shipped.device_uid


def test_derived_uids_are_deterministic_valid_and_distinct() -> None:
    one = derived_uid("1.2.3.4", "sr")
    assert one == derived_uid("1.2.3.4", "sr") and _valid_uid(one)
    assert len({one, derived_uid("1.2.3.4", "sr-series"), derived_uid("1.2.3.5", "sr")}) == 3
