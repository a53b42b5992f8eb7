"""The v0.3 GPU session script (docs/training_report/gpu_session_v03.py): lossless data packing and the choice rule.

The whole script is rehearsed with ``run --tiny`` (about a minute, so not here; the command is in
docs/training_report/gpu_session_v03.md); these are its pieces that decide what travels and what ships.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch", reason="torch (the [train] extra) is not installed")

from lungseg.data import load_manifest
from lungseg.train.cache import read_cache, write_cache

SCRIPT = Path(__file__).resolve().parents[1] / "docs/training_report/gpu_session_v03.py"


@pytest.fixture(scope="module")
def session():
    spec = importlib.util.spec_from_file_location("gpu_session_v03", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_pack_round_trip_is_bit_exact_and_smaller(session, fixture_manifest, tmp_path):
    records = load_manifest(fixture_manifest)[:6]
    cache = write_cache(records, tmp_path / "c.npz", 256, workers=1, bits=8)
    info = session.pack_cache(cache, tmp_path / "packed256.npz")
    assert info["images"] == 6 and info["size"] == 256
    assert info["packed_bytes"] < info["cache_bytes"]
    restored = session.unpack_cache(tmp_path / "packed256.npz", tmp_path / "back" / "c.npz")
    with np.load(cache) as a, np.load(restored) as b:
        np.testing.assert_array_equal(a["squares"], b["squares"])
        np.testing.assert_array_equal(a["labels"], b["labels"])
        assert str(a["meta"]) == str(b["meta"])
    _, samples = read_cache(restored)
    _, original = read_cache(cache)
    for key, sample in samples.items():
        np.testing.assert_array_equal(sample.image, original[key].image)


def test_pack_refuses_a_16_bit_cache(session, fixture_manifest, tmp_path):
    cache = write_cache(load_manifest(fixture_manifest)[:2], tmp_path / "c16.npz", 256, workers=1, bits=16)
    with pytest.raises(ValueError, match="8-bit cache"):
        session.pack_cache(cache, tmp_path / "p.npz")


def test_choice_respects_the_latency_limit_and_reports_the_trade_off(session):
    table = {"a256": {"size": 256}, "b384": {"size": 384}}
    opts = {
        "a256": {"members": ["a256"], "val_dice_256_common_reps": 0.960},
        "b384": {"members": ["b384"], "val_dice_256_common_reps": 0.965},
        "a256+b384": {"members": ["a256", "b384"], "val_dice_256_common_reps": 0.966},
    }
    decision = session.choose(opts, table, {256: 0.10, 384: 0.22}, limit=1.2)
    assert decision["chosen"] == "a256"
    assert decision["best_any_latency"] == "a256+b384"
    assert opts["a256+b384"]["cpu_latency_ratio"] == pytest.approx(3.2)
    assert session.choose(opts, table, {256: 0.10, 384: 0.22}, limit=2.5)["chosen"] == "b384"


def test_ensemble_dice_is_scored_on_shared_repetitions(session):
    class S:  # the two fields mean_dice reads from a Sample
        def __init__(self, lung):
            self.lung, self.valid = lung, np.ones_like(lung)

    truth = np.zeros((4, 4), np.uint8)
    truth[:2] = 1
    reference = {"x": S(truth)}
    good, bad = truth.astype(np.float32)[None], (1 - truth).astype(np.float32)[None]
    table = {"g": {"stage2_val_dice_256": {0: 1.0, 1: 1.0}}, "b": {"stage2_val_dice_256": {0: 0.0}}}
    probs = {("g", 0): good, ("g", 1): good, ("b", 0): bad}
    opts = session.options(table, probs, {0: ["x"], 1: ["x"]}, reference)
    assert opts["g"]["val_dice_256_common_reps"] == 1.0 and opts["g"]["val_dice_256"] == 1.0
    assert opts["g+b"]["reps"] == [0]  # rep 1 is g's alone: an ensemble is never scored there
    # mean probability 0.5 everywhere: every pixel kept, 8 true of 16 -> Dice 2*8/(16+8)
    assert opts["g+b"]["val_dice_256"] == pytest.approx(2 / 3)


def test_electrodes_add_bright_discs_and_leave_the_other_faults_alone():
    from lungseg.train.augment import intensity_augment

    content = np.full((128, 100), 0.3, np.float32)
    for seed in range(6):
        plain = intensity_augment(content, np.random.default_rng(seed))
        # probability 0 draws nothing more: the existing faults are bit for bit those of before
        np.testing.assert_array_equal(intensity_augment(content, np.random.default_rng(seed), 0.0), plain)
        with_leads = intensity_augment(content, np.random.default_rng(seed), 1.0)
        changed = with_leads != plain
        assert changed.sum() >= 3  # at least one disc (radius >= 1 px) or a lead
        assert with_leads[changed].min() >= 0.85  # only electrode pixels changed, and they are bright
        assert with_leads.max() <= 1 and with_leads.dtype == np.float32


def test_electrode_flag_reaches_the_run_config(fixture_manifest, tmp_path):
    from lungseg.train.cli import build_parser
    from lungseg.train.commands import _config_from_args

    args = build_parser().parse_args(["stage1", "--data", str(fixture_manifest), "--out", str(tmp_path),
                                      "--protocol", "product", "--electrode-probability", "0.5"])
    config = _config_from_args(args)
    assert config.electrode_probability == 0.5 and config.intensity_probability == 0.8
    args = build_parser().parse_args(["stage1", "--data", str(fixture_manifest), "--out", str(tmp_path)])
    assert _config_from_args(args).electrode_probability == 0.0
