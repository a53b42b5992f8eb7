"""One model version per bundle, carried by every output; a Device UID that changes with the model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pydicom
from edge_helpers import dciodvfy_errors, make_cr, run_once, save, sc_files, sidecars

from lungseg.bundle import BUNDLE_MANIFEST, default_bundle_dir, resolve_bundle, write_bundle_manifest


def _copy(tmp_path: Path) -> Path:
    dest = tmp_path / "bundle"
    shutil.copytree(default_bundle_dir(), dest, ignore=shutil.ignore_patterns("checkpoint.pt"))
    write_bundle_manifest(dest, {k: v for k, v in json.loads((dest / BUNDLE_MANIFEST).read_text()).items()
                                 if k not in ("schema", "files")})
    return dest


def test_bundle_json_version_wins_over_the_onnx_metadata(tmp_path: Path) -> None:
    dest = _copy(tmp_path)
    manifest = json.loads((dest / BUNDLE_MANIFEST).read_text())
    write_bundle_manifest(dest, {**{k: v for k, v in manifest.items() if k not in ("schema", "files")},
                                 "model_version": "9.9.9"})
    assert resolve_bundle(dest).version == "9.9.9"


def test_device_uid_changes_with_any_file_of_the_bundle_and_is_a_valid_uid(tmp_path: Path) -> None:
    dest = _copy(tmp_path)
    before = resolve_bundle(dest)
    version, sha, uid = before.version, before.sha256, before.device_uid  # properties: read them now
    golden = dest / "golden.npz"
    data = bytearray(golden.read_bytes())
    data[-1] ^= 1
    golden.write_bytes(bytes(data))
    manifest = json.loads((dest / BUNDLE_MANIFEST).read_text())
    write_bundle_manifest(dest, {k: v for k, v in manifest.items() if k not in ("schema", "files")})
    after = resolve_bundle(dest)
    assert after.version == version
    assert after.sha256 != sha and after.device_uid != uid
    for value in (uid, after.device_uid):
        assert value.startswith("2.25.") and len(value) <= 64 and pydicom.uid.UID(value).is_valid


def test_every_output_names_the_bundles_model_version_and_device(tmp_path: Path) -> None:
    bundle = resolve_bundle(default_bundle_dir())
    watch, out, state = tmp_path / "in", tmp_path / "out", tmp_path / "state"
    watch.mkdir()
    save(make_cr("1.2.826.0.1.3680043.8.498.77.1", size=256, pixel_spacing=(1.4, 1.4)), watch / "cr.dcm")
    assert run_once(watch, out, bundle.root, state=state, seg=True) == 0
    [sidecar] = sidecars(out)
    assert sidecar["model"]["version"] == bundle.version and sidecar["model"]["name"] == bundle.name
    assert sidecar["model"]["bundle_sha256"] == bundle.sha256 and sidecar["model"]["device_uid"] == bundle.device_uid
    [sc_path] = sc_files(out)
    for path in (sc_path, sc_path.with_name(sc_path.name.replace(".sc.dcm", ".seg.dcm"))):
        ds = pydicom.dcmread(path)
        ours = [item for item in ds.ContributingEquipmentSequence if getattr(item, "DeviceUID", None)]
        assert len(ours) == 1, path.name
        item = ours[0]
        assert item.DeviceUID == bundle.device_uid
        assert f"{bundle.name} {bundle.version}" in list(item.SoftwareVersions)
        assert bundle.sha256 in item.ContributionDescription
        assert dciodvfy_errors(path) == []
