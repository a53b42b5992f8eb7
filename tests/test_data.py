import pytest

from lungseg.data import load_manifest, read_label_mask, split_by_patient


def test_fixture_manifest_loads(fixture_manifest):
    records = load_manifest(fixture_manifest)
    assert len(records) == 20
    assert all(r.image.is_file() and r.mask.is_file() for r in records)
    assert {r.license for r in records} == {"CC BY 4.0 (Kermany)"}


def test_split_is_deterministic_patient_disjoint_and_balanced(shared_data):
    records = load_manifest(shared_data / "cxr" / "manifest.csv")
    parts = split_by_patient(records, (0.6, 0.2, 0.2), seed=3)
    assert parts == split_by_patient(records, (0.6, 0.2, 0.2), seed=3)
    assert parts != split_by_patient(records, (0.6, 0.2, 0.2), seed=4)
    patients = [{r.patient_id for r in p} for p in parts]
    assert not (patients[0] & patients[1]) and not (patients[0] & patients[2]) and not (patients[1] & patients[2])
    assert sum(len(p) for p in parts) == len(records)
    assert abs(len(parts[0]) / len(records) - 0.6) < 0.02


def test_ignore_label_is_invalid(shared_data):
    records = [r for r in load_manifest(shared_data / "cxr" / "manifest.csv") if r.id == "ef646e695922"]
    lung, valid = read_label_mask(records[0].mask)
    assert (~valid).sum() > 0 and not (lung & ~valid).any()


def test_manifest_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="manifest not found"):
        load_manifest(tmp_path / "nope.csv")
    bad = tmp_path / "m.csv"
    bad.write_text("id,image\n1,a.png\n")
    with pytest.raises(ValueError, match="lacks columns"):
        load_manifest(bad)
    with pytest.raises(ValueError, match="sum to 1"):
        split_by_patient([], (0.5, 0.2))
