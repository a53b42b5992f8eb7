import numpy as np
import pytest

from lungseg.preprocess import INPUT_SIZE, Geometry, preprocess, preprocess_batch


@pytest.mark.parametrize("shape", [(300, 500), (501, 257), (256, 256), (97, 1013), (1, 7), (2128, 2000)])
def test_geometry_round_trip_shape_and_content(shape):
    rows, cols = shape
    geometry = Geometry.for_shape(rows, cols)
    assert geometry.content_rows == INPUT_SIZE or geometry.content_columns == INPUT_SIZE
    # an ellipse mask survives the round trip at native size
    yy, xx = np.mgrid[:rows, :cols]
    mask = (((yy - rows / 2) / (rows / 3 + 0.5)) ** 2 + ((xx - cols / 2) / (cols / 3 + 0.5)) ** 2) <= 1
    model_space = geometry.to_model(mask.astype(np.float32))
    back = geometry.to_native(model_space) >= 0.5
    assert back.shape == (rows, cols)
    if min(rows, cols) >= 64:
        inter = np.count_nonzero(back & mask)
        assert 2 * inter / (back.sum() + mask.sum()) > 0.98


def test_letterbox_is_centred_and_padding_outside_content():
    geometry = Geometry.for_shape(100, 200)
    assert (geometry.content_rows, geometry.content_columns) == (128, 256)
    assert geometry.top == 64 and geometry.left == 0
    square = geometry.to_model(np.ones((100, 200), np.float32))
    assert square[:64].sum() == 0 and square[-64:].sum() == 0 and square[64:192].min() == 1


def test_preprocess_normalisation_is_the_donors():
    rng = np.random.default_rng(0)
    image = rng.random((300, 400)).astype(np.float32)
    tensor, geometry = preprocess(image)
    assert tensor.shape == (3, INPUT_SIZE, INPUT_SIZE) and tensor.dtype == np.float32
    assert np.array_equal(tensor[0], tensor[2])
    content = tensor[0][geometry.content]
    assert abs(float(content.mean())) < 1e-4 and abs(float(content.std()) - 1) < 1e-3
    # invariant to affine intensity changes (the percentiles absorb them)
    tensor2, _ = preprocess(image * 0.3 + 0.2)
    np.testing.assert_allclose(tensor, tensor2, atol=1e-3)


def test_preprocess_clips_above_99th_percentile():
    image = np.zeros((256, 256), np.float32)
    image[:128] = 0.5
    image[0, 0] = 100.0  # a burnt-in marker must not stretch the range
    tensor, _ = preprocess(image)
    values = np.unique(np.round(tensor[0], 3))
    assert len(values) <= 4


def test_preprocess_rejects_colour_and_batches():
    with pytest.raises(ValueError, match="2-D"):
        preprocess(np.zeros((10, 10, 3), np.float32))
    batch, geometries = preprocess_batch([np.random.rand(50, 80), np.random.rand(90, 40)])
    assert batch.shape == (2, 3, INPUT_SIZE, INPUT_SIZE) and len(geometries) == 2
