"""The product protocol's pieces: samples cache, augmentations, Dice + BCE, protocols, error analysis."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch (the [train] extra) is not installed")

from lungseg.data import load_manifest  # noqa: E402
from lungseg.preprocess import preprocess  # noqa: E402
from lungseg.train.augment import geometric_augment, intensity_augment, random_affine  # noqa: E402
from lungseg.train.cache import read_cache, write_cache  # noqa: E402
from lungseg.train.cli import main as train_main  # noqa: E402
from lungseg.train.dataset import SegmentationDataset, load_sample  # noqa: E402
from lungseg.train.error_analysis import REGIONS, analyse, region_map  # noqa: E402
from lungseg.train.loss import dice_bce_loss  # noqa: E402


def test_training_samples_are_the_runtime_preprocessing(fixture_manifest):
    record = load_manifest(fixture_manifest)[0]
    from lungseg.imaging import read_image

    expected, _ = preprocess(read_image(record.image).pixels, 256)
    np.testing.assert_array_equal(load_sample(record, 256).image, expected[0])


@pytest.mark.parametrize(("bits", "tolerance"), [(16, 1e-3), (8, 0.05)])
def test_samples_cache_round_trip(tmp_path, fixture_manifest, bits, tolerance):
    records = load_manifest(fixture_manifest)[:4]
    path = write_cache(records, tmp_path / "s.npz", 256, workers=1, bits=bits)
    cached_records, samples = read_cache(path)
    assert [r.id for r in cached_records] == [r.id for r in records]
    assert [r.patient_id for r in cached_records] == [r.patient_id for r in records]
    for record in records:
        exact, cached = load_sample(record, 256), samples[record.id]
        np.testing.assert_array_equal(cached.lung, exact.lung)
        np.testing.assert_array_equal(cached.valid, exact.valid)
        assert np.abs(cached.image - exact.image).max() < tolerance


def test_intensity_augmentation_changes_pixels_but_keeps_range_and_labels(fixture_manifest):
    sample = load_sample(load_manifest(fixture_manifest)[0], 128)
    content = sample.square[sample.geometry.content]
    changed = [intensity_augment(content, np.random.default_rng(seed)) for seed in range(8)]
    assert all(c.shape == content.shape and c.dtype == np.float32 for c in changed)
    assert all(c.min() >= 0.0 and c.max() <= 1.0 for c in changed)
    assert sum(not np.allclose(c, content) for c in changed) >= 6
    dataset = SegmentationDataset([sample], intensity_probability=1.0, seed=3)
    x1, y1, _ = dataset[0]
    x2, y2, _ = dataset[0]
    torch.testing.assert_close(x1, x2)  # same (seed, epoch, index): same draw, in any worker process
    dataset.epoch = 1
    assert not torch.allclose(dataset[0][0], x1)
    torch.testing.assert_close(y1, y2)


def test_geometric_augmentation_moves_image_and_masks_together():
    x = torch.zeros(2, 3, 64, 64)
    lung = torch.zeros(2, 1, 64, 64)
    x[:, :, 20:30, 10:20] = 5.0
    lung[:, :, 20:30, 10:20] = 1.0
    valid = torch.ones(2, 1, 64, 64)
    identity = random_affine(2, 10, 0.1, 0.05, 0.0, torch.Generator().manual_seed(0))
    _, li, _ = geometric_augment(x, lung, valid, identity)
    torch.testing.assert_close(li, lung)
    theta = random_affine(2, 20, 0.1, 0.1, 1.0, torch.Generator().manual_seed(1))
    xw, lw, vw = geometric_augment(x, lung, valid, theta)
    assert not torch.equal(lw, lung)
    # the bright square and the lung label still coincide after the warp
    bright = xw[:, :1] > 2.5
    agreement = (bright == (lw > 0.5)).float().mean()
    assert agreement > 0.98
    assert set(torch.unique(lw).tolist()) <= {0.0, 1.0} and set(torch.unique(vw).tolist()) <= {0.0, 1.0}


def test_dice_bce_ignores_the_ignore_label_and_rewards_the_truth():
    rng = np.random.default_rng(0)
    truth = torch.zeros(1, 1, 32, 32)
    truth[..., 8:24, 4:14] = truth[..., 8:24, 18:28] = 1
    valid = torch.ones_like(truth)
    valid[..., 12:16, :] = 0
    prob = torch.from_numpy(np.clip(truth.numpy() * 0.8 + rng.random((1, 1, 32, 32)) * 0.2, 0, 1)).float()
    other = prob.clone()
    other[valid == 0] = torch.rand(int((valid == 0).sum()))
    assert float(dice_bce_loss(prob, truth, valid)) == pytest.approx(float(dice_bce_loss(other, truth, valid)),
                                                                      abs=1e-6)
    assert float(dice_bce_loss(truth.clamp(0.01, 0.99), truth, valid)) < float(dice_bce_loss(prob, truth, valid))


def test_product_protocol_sets_its_recipe_and_flags_override(tmp_path, fixture_manifest):
    out = tmp_path / "run"
    args = ["stage1", "--data", str(fixture_manifest), "--out", str(out), "--protocol", "product",
            "--intensity-probability", "0.25", "--repetitions", "1", "--max-epochs", "1", "--batch-size", "4",
            "--init-features", "4", "--image-size", "64", "--device", "cpu", "--workers", "1"]
    assert train_main(args) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["protocol"] == "product" and config["loss"] == "dice_bce" and config["geometry"] == "batch"
    assert config["intensity_probability"] == 0.25 and config["max_epochs"] == 1
    done = json.loads((out / "stage1" / "rep00" / "done.json").read_text())
    assert 0.0 <= done["val_dice"] <= 1.0


def test_error_regions_follow_the_reference_lungs():
    truth = np.zeros((100, 100), bool)
    truth[20:80, 10:40] = truth[20:80, 60:90] = True
    regions = region_map(truth)
    assert REGIONS[regions[15, 25]] == "apex" and REGIONS[regions[85, 25]] == "base"
    assert REGIONS[regions[60, 50]] == "medial" and REGIONS[regions[50, 12]] == "lateral"
    prob = truth.astype(np.float32)
    prob[70:80, 10:40] = 0  # the model misses the left base
    result = analyse(truth, prob)
    assert result["main_region"] == "base" and result["fn"] == 300 and result["fp"] == 0
    assert result["dice"] == pytest.approx(2 * 3300 / (3300 + 3600))
