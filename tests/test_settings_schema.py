"""One declaration per setting: the sample TOML, the ``run`` flags and the loader are derived, and checked here.

Also the conventions shared by every command: the gate flags are defined once (``lungseg-segment`` and
``lungseg-edge run`` alike), ``--json`` is a switch everywhere, ``--gate`` is always the gate's mode, and
unknown config keys are errors in the edge and in training.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import REPO_ROOT

from lungseg import settings_schema as schema
from lungseg.edge_runtime import config as edge_config
from lungseg.edge_runtime.cli import build_parser, config_from_args
from lungseg.edge_runtime.config import ConfigError, EdgeConfig, settings_from_mapping
from lungseg.errors import LungsegError
from lungseg.gate_options import GateOptions, legacy_auto_orient
from lungseg.settings_schema import setting

SAMPLE = REPO_ROOT / "packaging" / "lungseg-edge.toml"


def _subparser(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[name]


def _run_parser() -> argparse.ArgumentParser:
    return _subparser(build_parser(), "run")


def _action(parser: argparse.ArgumentParser, flag: str) -> argparse.Action:
    return next(a for a in parser._actions if flag in a.option_strings)


# --- the drift test ----------------------------------------------------------------------------------------
def test_committed_sample_flags_and_loader_agree_with_the_schema() -> None:
    problems = edge_config.drift(SAMPLE.read_text(), _run_parser())
    assert problems == [], ("\n".join(problems) + "\nregenerate the sample: "
                            "lungseg-edge config --sample > packaging/lungseg-edge.toml")


def test_drift_check_catches_a_default_changed_in_the_committed_file(tmp_path: Path) -> None:
    copy = tmp_path / "lungseg-edge.toml"
    copy.write_text(SAMPLE.read_text().replace("\nbatch_size = 4\n", "\nbatch_size = 5\n"))
    assert copy.read_text() != SAMPLE.read_text()
    problems = edge_config.drift(copy.read_text(), _run_parser())
    assert any("differs from the generated one" in p and "batch_size = 5" in p for p in problems), problems
    assert any(p.startswith("sample file: batch_size = 5") for p in problems), problems
    # a comment edited by hand is drift too (the file is generated, never edited)
    comment = SAMPLE.read_text().replace("Default: the bundle's calibrated value", "Default: 0.9", 1)
    assert edge_config.drift(comment) != []


def test_drift_check_catches_hand_written_help() -> None:
    parser = _run_parser()
    _action(parser, "--gate-mirror-threshold").help = "P(mirrored) above which an image is flagged (default 0.9)"
    problems = edge_config.drift(SAMPLE.read_text(), parser)
    assert len(problems) == 1 and problems[0].startswith("--gate-mirror-threshold: help"), problems


def test_drift_check_catches_a_default_changed_in_the_schema() -> None:
    @dataclass
    class Changed(EdgeConfig):
        batch_size: int = field(default=8, metadata=setting(
            section=edge_config.MODEL, help="most files per inference batch when several are waiting"))

    text = SAMPLE.read_text()
    problems = schema.drift(Changed, committed=text,
                            expected=schema.sample_toml(Changed, edge_config.SAMPLE_HEADER, edge_config.SECTIONS),
                            loaded=settings_from_mapping(edge_config.tomllib.loads(text)), parser=_run_parser())
    assert any("differs from the generated one" in p for p in problems), problems
    assert "sample file: batch_size = 4, the schema says 8" in problems
    assert any(p.startswith("--batch-size: help") for p in problems)


def test_config_sample_command_prints_the_committed_file(capsys: pytest.CaptureFixture[str]) -> None:
    from lungseg.edge_runtime.cli import main

    assert main(["config", "--sample"]) == 0
    assert capsys.readouterr().out == SAMPLE.read_text() == edge_config.sample_toml()


# --- derived loader and flags ------------------------------------------------------------------------------
def _flag_args(spec: schema.Spec, value: object) -> list[str]:
    if spec.kind == "bool":
        return [spec.flag if value else spec.flag.replace("--", "--no-", 1)]
    if spec.meta.count:
        return ["-" + "v" * int(value)] if value else []  # type: ignore[call-overload]
    return [spec.flag, ",".join(value) if isinstance(value, list) else str(value)]


def test_every_setting_means_the_same_as_a_flag_and_in_the_file(tmp_path: Path) -> None:
    """Each setting, given as its flag and as its TOML key, makes the same config; flags beat the file."""
    base = {"watch": str(tmp_path / "w"), "out": str(tmp_path / "o")}
    for spec in schema.specs(EdgeConfig):
        value = spec.sample if spec.sample is not None else spec.default
        if value is None or spec.name in base:
            continue
        if spec.name == "once":
            value = True
        from_file = EdgeConfig(**settings_from_mapping({**base, spec.name: value}))
        args = _run_parser().parse_args(["--watch", base["watch"], "--out", base["out"], *_flag_args(spec, value)])
        from_flag = config_from_args(args)
        assert getattr(from_flag, spec.name) == getattr(from_file, spec.name), spec.name
    args = build_parser().parse_args(["run"])
    assert edge_config.flag_settings(args) == {}  # an unset flag never overrides the file


@pytest.mark.parametrize(("key", "value", "message"), [
    ("batch_sise", 3, "unknown setting 'batch_sise'"), ("seg", "yes", "seg must be true or false"),
    ("batch_size", 2.5, "batch_size must be an integer"), ("poll_interval", "2", "poll_interval must be a number"),
    ("backend", 1, "backend must be a string"), ("watch", "", "watch must be a non-empty path"),
    ("ignore", [1], "ignore must be a list of strings"), ("gate_mirror_threshold", True, "must be a number"),
])
def test_the_loader_names_the_key_it_refuses(key: str, value: object, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        settings_from_mapping({key: value})
    assert isinstance(info.value, LungsegError) and isinstance(info.value, ValueError)


def test_choices_come_from_the_schema(tmp_path: Path) -> None:
    for name in ("backend", "sc_syntax", "sc_verify", "quarantine_mode", "postprocess_resolution", "gate"):
        with pytest.raises(ConfigError, match=name):
            EdgeConfig(watch=tmp_path / "w", out=tmp_path / "o", **{name: "nonsense"}).validate()


def test_help_prints_the_real_defaults() -> None:
    parser = _run_parser()
    assert _action(parser, "--batch-size").help.endswith("(default: 4)")
    assert _action(parser, "--seg").help.endswith("(default: on)")
    assert _action(parser, "--polling").help.endswith("(default: off)")
    mirror = _action(parser, "--gate-mirror-threshold").help
    assert "default: the bundle's calibrated value" in mirror
    for spec in schema.specs(EdgeConfig):  # every default None is said in words
        assert spec.default is not None or spec.meta.default_text, spec.name


def test_defaults_are_those_of_the_dataclass() -> None:
    config = EdgeConfig()
    for spec in schema.specs(EdgeConfig):
        assert getattr(config, spec.name) == spec.default
    assert {f.name for f in dataclasses.fields(EdgeConfig)} == {s.name for s in schema.specs(EdgeConfig)}


# --- the gate's options, shared --------------------------------------------------------------------------
def test_gate_options_make_the_default_gate_policy() -> None:
    from lungseg.gate import GatePolicy, policy_from_settings

    assert policy_from_settings(GateOptions()) == GatePolicy()
    assert policy_from_settings(EdgeConfig()) == GatePolicy()


def test_segment_and_edge_take_the_same_gate_flags() -> None:
    from lungseg.segment import build_parser as segment_parser

    segment, edge = segment_parser(), _run_parser()
    for spec in schema.specs(GateOptions):
        a, b = _action(segment, spec.flag), _action(edge, spec.flag)
        assert (a.option_strings, a.choices, a.help, type(a)) == (b.option_strings, b.choices, b.help, type(b))
        assert (a.default, b.default) == (spec.default, None)  # the edge's come from its config file
    args = segment.parse_args(["x.png", "--out", "o", "--no-auto-orient", "--gate", "flag"])
    assert (args.auto_orient, args.gate) == (False, "flag")
    args = edge.parse_args(["--no-auto-orient", "--gate", "flag"])
    assert (args.auto_orient, args.gate) == (False, "flag")


@pytest.mark.parametrize(("argv", "expected", "found"), [
    (["a.png", "--auto-orient", "off"], ["a.png", "--no-auto-orient"], True),
    (["--auto-orient=on", "a.png"], ["--auto-orient", "a.png"], True),
    (["--auto-orient", "a.png"], ["--auto-orient", "a.png"], False),
    (["--", "--auto-orient", "off"], ["--", "--auto-orient", "off"], False),
])
def test_the_old_auto_orient_form_is_rewritten(argv: list[str], expected: list[str], found: bool) -> None:
    assert legacy_auto_orient(argv) == (expected, found)


# --- one meaning per flag name ---------------------------------------------------------------------------
def _parsers() -> dict[str, argparse.ArgumentParser]:
    from lungseg.export.cli import build_parser as export_parser
    from lungseg.segment import build_parser as segment_parser
    from lungseg.train.cli import build_parser as train_parser

    out = {"lungseg-segment": segment_parser(), "lungseg-export": export_parser()}
    for prog, parser in (("lungseg-edge", build_parser()), ("lungseg-train", train_parser())):
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        out.update({f"{prog} {name}": p for name, p in sub.choices.items()})
    return out


def test_json_is_a_switch_and_gate_a_mode_in_every_command() -> None:
    for name, parser in _parsers().items():
        for action in parser._actions:
            if "--json" in action.option_strings:
                assert action.nargs == 0, f"{name}: --json takes a value (use --json-out PATH)"
            if "--gate" in action.option_strings:
                assert tuple(action.choices or ()) == ("off", "flag", "refuse"), f"{name}: --gate is not the mode"


def test_export_help_states_the_parity_defaults() -> None:
    from lungseg.export.cli import build_parser as export_parser
    from lungseg.export.parity import DEFAULT_MIN_DICE_FP32, DEFAULT_MIN_DICE_REDUCED

    parser = export_parser()
    assert _action(parser, "--min-dice-fp32").help.endswith(f"(default: {DEFAULT_MIN_DICE_FP32})")
    assert _action(parser, "--min-dice-reduced").help.endswith(f"(default: {DEFAULT_MIN_DICE_REDUCED})")


def test_train_config_rejects_unknown_keys(tmp_path: Path) -> None:
    from lungseg.train.config import TrainConfig, TrainConfigError

    saved = tmp_path / "config.json"
    TrainConfig(lr=3e-4).save(saved)
    assert TrainConfig.load(saved).lr == 3e-4
    saved.write_text(saved.read_text().replace('"lr":', '"learning_rate":'))
    with pytest.raises(TrainConfigError, match="unknown training setting 'learning_rate'") as info:
        TrainConfig.load(saved)
    assert isinstance(info.value, LungsegError) and isinstance(info.value, ValueError)
    assert str(saved) in str(info.value)
