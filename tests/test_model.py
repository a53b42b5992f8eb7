from pathlib import Path

import pytest

torch = pytest.importorskip("torch", reason="torch (the [train] extra) is not installed")

from lungseg.nn.unet import DonorUnavailableError, UNet, load_donor  # noqa: E402

REFERENCE = Path(__file__).resolve().parent / "fixtures" / "buda_unet_state_dict.txt"


def _reference_entries() -> list[tuple[str, tuple[int, ...]]]:
    entries = []
    for line in REFERENCE.read_text().splitlines():
        name, shape = line.split()
        entries.append((name, () if shape == "scalar" else tuple(int(s) for s in shape.split("x"))))
    return entries


def test_state_dict_matches_buda_names_and_shapes_exactly():
    entries = _reference_entries()
    assert len(entries) == 118
    ours = UNet().state_dict()
    assert [(k, tuple(v.shape)) for k, v in ours.items()] == entries


def test_buda_shaped_state_dict_loads_strict():
    state = {}
    for name, shape in _reference_entries():
        state[name] = torch.tensor(7, dtype=torch.long) if name.endswith("num_batches_tracked") else torch.randn(shape)
    model = UNet()
    model.load_state_dict(state, strict=True)
    assert torch.equal(model.state_dict()["conv.weight"], state["conv.weight"])


def test_parameter_count_and_sigmoid_output():
    model = UNet().eval()
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 7_763_041
    with torch.no_grad():
        out = model(torch.randn(1, 3, 64, 64) * 10)
    assert out.shape == (1, 1, 64, 64)
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0


def test_load_donor_local_file_and_scratch(tmp_path):
    reference = UNet()
    path = tmp_path / "unet-e012d006.pt"
    torch.save(reference.state_dict(), path)
    loaded = load_donor(path)
    key = "encoder1.enc1conv1.weight"
    assert torch.equal(loaded.state_dict()[key], reference.state_dict()[key])
    assert isinstance(load_donor("scratch"), UNet)


def test_load_donor_missing_and_corrupt_files_fail_clearly(tmp_path):
    with pytest.raises(DonorUnavailableError, match="not found"):
        load_donor(tmp_path / "absent.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(DonorUnavailableError, match=r"bad\.pt"):
        load_donor(bad)


def test_load_donor_hub_offline_names_the_weights_file(monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr(torch.hub, "load", offline)
    with pytest.raises(DonorUnavailableError, match=r"unet-e012d006\.pt"):
        load_donor("hub")
