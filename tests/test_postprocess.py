import numpy as np

from lungseg.data import read_label_mask
from lungseg.postprocess import PostprocessConfig, artefacts, fill_holes, keep_largest, postprocess


def _blobs() -> np.ndarray:
    prob = np.zeros((100, 100), np.float32)
    prob[10:80, 10:40] = 0.9  # left lung
    prob[10:80, 60:90] = 0.8  # right lung
    prob[90:95, 90:95] = 0.7  # island
    prob[40:45, 20:25] = 0.1  # hole in the left lung
    return prob


def test_threshold_two_largest_and_holes():
    mask = postprocess(_blobs())
    assert not mask[92, 92]  # island removed
    assert mask[42, 22]  # hole filled
    assert artefacts(mask) == {"components": 2, "islands": False, "lungs_joined": False, "artefact": False}


def test_configurable():
    raw = postprocess(_blobs(), PostprocessConfig(keep_components=0, fill_holes=False))
    assert raw[92, 92] and not raw[42, 22]
    assert artefacts(raw)["islands"]
    strict = postprocess(_blobs(), PostprocessConfig(threshold=0.85))
    assert strict[20, 20] and not strict[20, 70]


def test_bridge_is_reported_as_joined():
    prob = _blobs()
    prob[30:35, 40:60] = 0.9  # bridge between lungs
    assert artefacts(prob >= 0.5)["lungs_joined"] is False  # island still present
    assert artefacts(keep_largest(prob >= 0.5, 1))["lungs_joined"] is True


def test_fill_holes_keeps_border_background():
    mask = np.zeros((20, 20), bool)
    mask[5:15, 5:15] = True
    mask[8:12, 8:12] = False
    filled = fill_holes(mask)
    assert filled[9, 9] and not filled[0, 0] and filled.sum() == 100


def test_real_masks_have_two_lungs_after_postprocessing(fixture_manifest):
    from lungseg.data import load_manifest

    for record in load_manifest(fixture_manifest)[:10]:
        lung, _ = read_label_mask(record.mask)
        noisy = lung.astype(np.float32)
        noisy[:3, :3] = 1.0  # a corner island
        cleaned = postprocess(noisy)
        assert artefacts(cleaned)["components"] == 2, record.id
        assert not cleaned[:3, :3].any()


def test_guided_upscale_follows_the_probability_and_keeps_postprocessing():
    """Edges where the upscaled probability crosses the threshold; removed islands and filled holes stay so."""
    import cv2

    from lungseg.postprocess import postprocess, upscale_guided

    yy, xx = np.mgrid[0:64, 0:64]
    probability = np.clip(1.2 - np.hypot(yy - 32, xx - 24) / 14.0, 0, 1).astype(np.float32)  # a soft disc
    probability[4:6, 56:58] = 0.9  # an island postprocessing removes
    probability[31:33, 23:25] = 0.1  # a hole it fills
    final = postprocess(probability, PostprocessConfig(keep_components=1))
    big = upscale_guided(final, probability, (256, 256), 0.5)
    assert big.shape == (256, 256) and big.dtype == bool
    plain = cv2.resize(probability, (256, 256), interpolation=cv2.INTER_LINEAR) >= 0.5
    assert not big[16:24, 224:232].any() and plain[16:24, 224:232].any()  # the island stays removed
    assert big[124:132, 92:100].all() and not plain[124:132, 92:100].all()  # the hole stays filled
    edge = np.ones((256, 256), bool)
    edge[:40, 200:] = edge[100:160, 70:120] = False  # away from the two edits: the probability's own edge
    assert np.array_equal(big[edge], plain[edge])
    assert np.array_equal(upscale_guided(final, probability, (64, 64), 0.5), final)
