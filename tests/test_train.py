"""Tiny real training runs on the committed fixtures (CPU, a few seconds each)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch (the [train] extra) is not installed")

from lungseg.metrics import image_metrics  # noqa: E402
from lungseg.train.cli import main as train_main  # noqa: E402
from lungseg.train.loss import smooth_dice_loss  # noqa: E402

TINY = ["--repetitions", "1", "--max-epochs", "2", "--batch-size", "4", "--init-features", "4",
        "--device", "cpu", "--workers", "1"]


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_tiny_two_stage_run_writes_every_artefact(tmp_path, fixture_manifest):
    run = tmp_path / "run"
    assert train_main(["run", "--data", str(fixture_manifest), "--out", str(run), *TINY]) == 0
    assert json.loads((run / "config.json").read_text())["max_epochs"] == 2
    plan = json.loads((run / "data_plan.json").read_text())
    assert plan["stage2_images"] + plan["independent_images"] == 8
    for stage in ("stage1", "stage2"):
        rep = run / stage / "rep00"
        for name in ("best.pt", "done.json", "split.json", "log.jsonl"):
            assert (rep / name).is_file(), rep / name
        assert not (rep / "last.pt").exists()
        assert [e["epoch"] for e in _lines(rep / "log.jsonl")] == [1, 2]
        checkpoint = torch.load(rep / "best.pt", weights_only=True)
        assert checkpoint["stage"] == stage and "model" in checkpoint
    metrics = json.loads((run / "evaluation" / "metrics.json").read_text())
    assert metrics["repetitions"] == {"stage1": 1, "stage2": 1}
    assert 0.0 <= metrics["independent_overall"]["stage2"]["DICE"]["mean"] <= 1.0
    report = run / "report"
    text = (report / "report.md").read_text()
    assert "Table 1" in text and "Tables 3 and 4" in text and "0.9554" in text  # the paper's number beside ours
    for png in ("loss_curves.png", "per_class_stage1_vs_stage2.png", "overlays_stage1_red_stage2_blue.png"):
        assert (report / png).stat().st_size > 1000
    assert train_main(["best", str(run)]) == 0
    # rerunning the finished run trains nothing more
    assert train_main(["run", "--data", str(fixture_manifest), "--out", str(run), *TINY]) == 0
    assert len(_lines(run / "stage1" / "rep00" / "log.jsonl")) == 2


def test_training_loss_goes_down(tmp_path, fixture_manifest):
    from lungseg.data import load_manifest
    from lungseg.nn.unet import UNet
    from lungseg.train.config import TrainConfig
    from lungseg.train.dataset import load_samples
    from lungseg.train.loop import train_stage

    samples = load_samples(load_manifest(fixture_manifest), 256)
    config = TrainConfig(max_epochs=4, batch_size=4, rotation_probability=0.0, device="cpu")
    torch.manual_seed(0)
    train_stage(UNet(init_features=8), samples, samples[:4], config, tmp_path, "stage1", seed=0)
    losses = [e["train_loss"] for e in _lines(tmp_path / "log.jsonl")]
    assert losses[-1] < losses[0] - 0.02, losses


def test_a_kill_after_the_first_log_line_but_before_last_pt_repeats_no_epoch(tmp_path, fixture_manifest):
    """The window the Ray kill test once hit: epoch 1 logged, its last.pt never written."""
    from lungseg.data import load_manifest
    from lungseg.nn.unet import UNet
    from lungseg.train.config import TrainConfig
    from lungseg.train.dataset import load_samples
    from lungseg.train.loop import train_stage

    samples = load_samples(load_manifest(fixture_manifest), 128)[:4]
    config = TrainConfig(max_epochs=1, batch_size=4, rotation_probability=0.0, device="cpu")
    train_stage(UNet(init_features=4), samples, samples[:2], config, tmp_path, "stage1", seed=0)
    (tmp_path / "done.json").unlink()
    assert not (tmp_path / "last.pt").exists()  # a finished stage keeps no last.pt: the state a SIGKILL
    # between the first log line and the first last.pt leaves
    assert [e["epoch"] for e in _lines(tmp_path / "log.jsonl")] == [1]
    config = TrainConfig(max_epochs=2, batch_size=4, rotation_probability=0.0, device="cpu")
    train_stage(UNet(init_features=4), samples, samples[:2], config, tmp_path, "stage1", seed=0)
    assert [e["epoch"] for e in _lines(tmp_path / "log.jsonl")] == [1, 2]


def test_a_killed_run_resumes_where_it_stopped(tmp_path, fixture_manifest):
    args = ["stage1", "--data", str(fixture_manifest), *TINY]
    args[args.index("--max-epochs") + 1] = "3"
    command = [sys.executable, "-m", "lungseg.train.cli", *args, "--out"]
    # every run in a fresh process, so thread settings left by other tests cannot change the numbers
    reference = tmp_path / "reference"
    subprocess.run([*command, str(reference)], check=True, capture_output=True, timeout=300)

    stopped = tmp_path / "stopped"
    log = stopped / "stage1" / "rep00" / "log.jsonl"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([*command, str(stopped)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    last = stopped / "stage1" / "rep00" / "last.pt"
    while time.monotonic() < deadline and not (last.is_file() and log.is_file() and len(_lines(log)) >= 1):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    done_early = len(_lines(log))
    assert 1 <= done_early < 3, "the run should have been killed mid-way"
    assert last.is_file()

    subprocess.run([*command, str(stopped)], check=True, capture_output=True, timeout=300)
    resumed = _lines(log)
    expected = _lines(reference / "stage1" / "rep00" / "log.jsonl")
    assert [e["epoch"] for e in resumed] == [1, 2, 3]
    np.testing.assert_allclose([e["train_loss"] for e in resumed], [e["train_loss"] for e in expected], rtol=1e-5)
    np.testing.assert_allclose([e["val_loss"] for e in resumed], [e["val_loss"] for e in expected], rtol=1e-5)


def test_ignore_label_changes_neither_loss_nor_metrics():
    rng = np.random.default_rng(0)
    truth = np.zeros((64, 64), bool)
    truth[10:50, 8:28] = truth[10:50, 36:56] = True
    prob = np.clip(truth * 0.8 + rng.random((64, 64)) * 0.3, 0, 1).astype(np.float32)
    valid = np.ones_like(truth)
    valid[20:30, 10:40] = False  # a pacemaker lead drawn over the lungs
    other = prob.copy()
    other[~valid] = rng.random(int((~valid).sum()))  # anything at all under the ignore label

    def loss(p: np.ndarray) -> float:
        return float(smooth_dice_loss(torch.from_numpy(p), torch.from_numpy(truth.astype(np.float32)),
                                      torch.from_numpy(valid.astype(np.float32))))

    assert loss(prob) == pytest.approx(loss(other), abs=1e-7)
    assert image_metrics(prob, truth, valid) == pytest.approx(image_metrics(other, truth, valid))
    # and without the ignore mask the difference does show
    assert image_metrics(prob, truth) != pytest.approx(image_metrics(other, truth))
