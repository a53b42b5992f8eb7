"""The shipped default model: present, used by default, and a real trained model."""

from __future__ import annotations

import json

import cv2
import numpy as np
from conftest import REPO_ROOT

from lungseg.bundle import default_bundle_dir, resolve_bundle
from lungseg.data import load_manifest, read_label_mask
from lungseg.metrics import dice
from lungseg.segment import EXIT_OK, main


def test_default_bundle_is_complete_with_card_and_parity():
    root = default_bundle_dir()
    for name in ("model.onnx", "model.fp16.onnx", "model.int8.onnx", "parity.json", "MODEL_CARD.md"):
        assert (root / name).is_file(), name
    bundle = resolve_bundle(None)
    assert bundle.name == "lungseg-unet"
    assert bundle.metadata["threshold"] == "0.5"
    parity = json.loads((root / "parity.json").read_text())
    assert parity["passed"] is True
    card = (root / "MODEL_CARD.md").read_text()
    assert "scratch" in card and "not for diagnosis" in card.lower()


def test_segment_without_model_uses_the_shipped_model(tmp_path, fixture_manifest, capsys):
    records = load_manifest(fixture_manifest)[:6]
    assert main([*(str(r.image) for r in records), "--out", str(tmp_path)]) == EXIT_OK
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert {line["model"] for line in lines} == {"lungseg-unet"}
    scores = []
    for record in records:
        mask = cv2.imread(str(tmp_path / f"{record.image.stem}_mask.png"), cv2.IMREAD_UNCHANGED) > 0
        truth, valid = read_label_mask(record.mask)
        scores.append(dice(mask & valid, truth & valid))
    # a trained model, not a placeholder: these paediatric fixtures come from the training source
    assert float(np.mean(scores)) > 0.85, scores


def test_readme_performance_section_is_generated_from_the_committed_json():
    from lungseg.benchmarks.readme import END, START, performance_section

    source = "docs/benchmarks/cpu.json"
    result = json.loads((REPO_ROOT / source).read_text())
    readme = (REPO_ROOT / "README.md").read_text()
    block = readme.split(START, 1)[1].split(END, 1)[0]
    assert block == "\n" + performance_section(result, source)
