"""Settings of ``lungseg-edge run``: defaults < TOML config file < command-line flags.

The TOML file holds the same names as the flags, with underscores (dashes are
accepted too), at top level or in an ``[edge]`` table. Relative paths in the file
are resolved against the file's own folder. Unknown keys are an error, so a typo
never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

try:  # Python 3.11+
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python 3.10 (JetPack 6) needs the tomli backport
    import tomli as tomllib  # type: ignore[no-redef]

BACKENDS = ("auto", "tensorrt", "cuda", "cpu")
QUARANTINE_MODES = ("copy", "move")
SC_SYNTAXES = ("explicit", "rle", "jpegls")
SC_VERIFY = ("parse", "decode")
POSTPROCESS_RESOLUTIONS = ("model", "native")
DEFAULT_IGNORE = ("*.part", "*.tmp", "*.partial", "*.filepart", "*.crdownload", "*.swp", "*~")


class ConfigError(ValueError):
    """A configuration file or flag combination that cannot be used."""


@dataclass
class EdgeConfig:
    """Everything ``lungseg-edge run`` needs; see ``packaging/lungseg-edge.toml`` for the meaning."""

    watch: Path | None = None
    out: Path | None = None
    state: Path | None = None
    model: Path | None = None
    backend: str = "auto"
    seg: bool = False
    once: bool = False
    polling: bool = False
    poll_interval: float = 2.0
    stable_seconds: float = 2.0
    settle_seconds: float = 0.5
    recursive: bool = True
    ignore: list[str] = field(default_factory=lambda: list(DEFAULT_IGNORE))
    batch_size: int = 4
    threads: int | None = None
    threshold: float | None = None
    quarantine_mode: str = "copy"
    sc_syntax: str = "explicit"
    sc_max_side: int = 0
    sc_verify: str = "parse"
    decode_min_side: int = 256  # the model's input size: the network never sees an upsampled image
    postprocess_resolution: str = "model"
    gate: str = "refuse"  # image gate: off | flag | refuse (see lungseg.gate)
    auto_orient: bool = True
    gate_correct_threshold: float = 0.9
    gate_uncertain_threshold: float = 0.7
    gate_mirror_threshold: float | None = None  # None: the bundle gate's calibrated threshold
    gate_refuse_threshold: float = 0.9
    retry_seconds: float = 30.0
    rescan_seconds: float = 300.0
    forward_host: str | None = None
    forward_port: int = 104
    forward_ae: str = "ANY-SCP"
    forward_calling_ae: str = "LUNGSEG"
    forward_retry_seconds: float = 60.0
    scp_port: int | None = None
    scp_ae: str = "LUNGSEG"
    scp_bind: str = "127.0.0.1"
    scp_allow: list[str] = field(default_factory=list)
    metrics_port: int | None = None
    metrics_bind: str = "127.0.0.1"
    health_stale_seconds: float = 600.0
    log_json: bool = False
    log_uids: bool = False
    log_file_names: bool = False
    isolate_decode: bool = True
    decode_timeout_seconds: float = 60.0
    decode_memory_mb: int = 2048
    max_file_mb: int = 512
    max_pixels: int = 50_000_000
    max_frames: int = 64
    quarantine_grace_seconds: float = 10.0
    max_retry_seconds: float = 600.0
    verbose: int = 0

    # --- derived locations -------------------------------------------------
    @property
    def state_dir(self) -> Path:
        """Ledger and lock: ``--state``, else ``<out>/.lungseg-state``."""
        if self.state is not None:
            return self.state
        assert self.out is not None
        return self.out / ".lungseg-state"

    @property
    def quarantine_dir(self) -> Path:
        """``<state>/quarantine`` when ``--state`` is given, else ``<out>/quarantine``."""
        base = self.state if self.state is not None else self.out
        assert base is not None
        return base / "quarantine"

    def decode_limits(self):
        """The header limits for :func:`lungseg.dicom_decode.read_dicom` (``max_file_mb``, ``max_pixels``...)."""
        from lungseg.dicom_decode import DecodeLimits

        return DecodeLimits(max_file_bytes=self.max_file_mb << 20, max_pixels=self.max_pixels,
                            max_frames=self.max_frames)

    def gate_policy(self):
        """The image gate's :class:`lungseg.gate.GatePolicy` (raises ValueError when invalid)."""
        from lungseg.gate import GatePolicy

        return GatePolicy(mode=self.gate, auto_orient=self.auto_orient,
                          correct_threshold=self.gate_correct_threshold,
                          uncertain_threshold=self.gate_uncertain_threshold,
                          mirrored_threshold=self.gate_mirror_threshold,
                          not_chest_refuse=max(self.gate_refuse_threshold, GatePolicy().not_chest_flag))

    def validate(self) -> EdgeConfig:
        if self.watch is None or self.out is None:
            raise ConfigError("both a watch folder (--watch) and an output folder (--out) are required")
        if self.backend not in BACKENDS:
            raise ConfigError(f"backend must be one of {BACKENDS}, not {self.backend!r}")
        if self.quarantine_mode not in QUARANTINE_MODES:
            raise ConfigError(f"quarantine_mode must be one of {QUARANTINE_MODES}, not {self.quarantine_mode!r}")
        if self.sc_syntax not in SC_SYNTAXES:
            raise ConfigError(f"sc_syntax must be one of {SC_SYNTAXES}, not {self.sc_syntax!r}")
        try:
            self.gate_policy()
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        if self.sc_verify not in SC_VERIFY:
            raise ConfigError(f"sc_verify must be one of {SC_VERIFY}, not {self.sc_verify!r}")
        if self.postprocess_resolution not in POSTPROCESS_RESOLUTIONS:
            raise ConfigError(f"postprocess_resolution must be one of {POSTPROCESS_RESOLUTIONS}, "
                              f"not {self.postprocess_resolution!r}")
        for name in ("sc_max_side", "decode_min_side"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must not be negative (0: no limit / full resolution)")
        if self.batch_size < 1:
            raise ConfigError("batch_size must be at least 1")
        for name in ("decode_timeout_seconds", "decode_memory_mb", "max_file_mb", "max_pixels", "max_frames"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive")
        for name in ("poll_interval", "stable_seconds", "settle_seconds", "retry_seconds", "rescan_seconds",
                     "quarantine_grace_seconds", "max_retry_seconds"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must not be negative")
        if self.threshold is not None and not 0.0 < self.threshold < 1.0:
            raise ConfigError("threshold must lie strictly between 0 and 1")
        for name in ("forward_ae", "forward_calling_ae"):
            title = getattr(self, name)
            if not 0 < len(title) <= 16 or "\\" in title or not title.isascii():
                raise ConfigError(f"{name} must be 1-16 ASCII characters (a DICOM AE title)")
        if not 0 < self.forward_port < 65536:
            raise ConfigError("forward_port must be a TCP port number")
        for name in ("scp_port", "metrics_port"):  # 0: any free port (tests)
            port = getattr(self, name)
            if port is not None and not 0 <= port < 65536:
                raise ConfigError(f"{name} must be a TCP port number")
        for title in (self.scp_ae, *self.scp_allow):
            if not 0 < len(title) <= 16 or "\\" in title or not title.isascii() or not title.strip():
                raise ConfigError(f"scp_ae and scp_allow entries must be 1-16 ASCII characters, not {title!r}")
        if self.scp_port is not None and self.once:
            raise ConfigError("the DICOM receiver (scp_port) runs with the service, not with --once")
        if self.health_stale_seconds <= 0:
            raise ConfigError("health_stale_seconds must be positive")
        watch = self.watch.resolve()
        for name in ("out", "state"):
            other = getattr(self, name)
            if other is not None and other.resolve() == watch:
                raise ConfigError(f"the {name} folder must not be the watch folder")
        return self


_FIELDS = {f.name: f for f in dataclasses.fields(EdgeConfig)}
_PATHS = {"watch", "out", "state", "model"}
_BOOLS = {"seg", "once", "polling", "recursive", "log_json", "log_uids"}
_INTS = {"batch_size", "threads", "verbose", "forward_port", "sc_max_side", "decode_min_side", "scp_port",
         "metrics_port"}
_FLOATS = {"poll_interval", "stable_seconds", "settle_seconds", "retry_seconds", "rescan_seconds", "threshold",
           "forward_retry_seconds", "health_stale_seconds"}
_STRS = {"backend", "quarantine_mode", "sc_syntax", "sc_verify", "postprocess_resolution", "forward_host", "forward_ae",
         "forward_calling_ae", "scp_ae", "scp_bind", "metrics_bind"}
_BOOLS |= {"log_file_names", "isolate_decode"}
_INTS |= {"decode_memory_mb", "max_file_mb", "max_pixels", "max_frames"}
_FLOATS |= {"decode_timeout_seconds", "quarantine_grace_seconds", "max_retry_seconds"}
_STRS |= {"gate"}
_BOOLS |= {"auto_orient"}
_FLOATS |= {"gate_correct_threshold", "gate_uncertain_threshold", "gate_mirror_threshold", "gate_refuse_threshold"}


def _coerce(name: str, value: Any, base: Path | None) -> Any:
    if name in _PATHS:
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{name} must be a non-empty path string")
        path = Path(value).expanduser()
        return (base / path) if (base is not None and not path.is_absolute()) else path
    if name in _BOOLS:
        if not isinstance(value, bool):
            raise ConfigError(f"{name} must be true or false")
        return value
    if name in _INTS:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{name} must be an integer")
        return value
    if name in _FLOATS:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{name} must be a number")
        return float(value)
    if name in _STRS:
        if not isinstance(value, str):
            raise ConfigError(f"{name} must be a string")
        return value
    if name == "ignore":
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError("ignore must be a list of glob patterns")
        return list(value)
    if name == "scp_allow":  # a list, or one comma-separated string (the flag)
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError("scp_allow must be a list of calling AE titles")
        return list(value)
    raise ConfigError(f"unknown setting {name!r}")  # pragma: no cover - guarded by caller


def settings_from_mapping(data: dict[str, Any], base: Path | None = None) -> dict[str, Any]:
    """Validate and coerce a mapping of setting names (TOML keys or flags) to values."""
    if "edge" in data and isinstance(data["edge"], dict):
        data = {**{k: v for k, v in data.items() if k != "edge"}, **data["edge"]}
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = key.replace("-", "_")
        if name not in _FIELDS:
            known = ", ".join(sorted(_FIELDS))
            raise ConfigError(f"unknown setting {key!r} (known: {known})")
        out[name] = _coerce(name, value, base)
    return out


def load_toml(path: Path) -> dict[str, Any]:
    """Read a TOML config file into validated settings (paths resolved against its folder)."""
    try:
        with Path(path).open("rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError as exc:
        raise ConfigError(f"config file {path} not found") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path}: {exc}") from exc
    return settings_from_mapping(data, base=Path(path).resolve().parent)


def build_config(file_settings: dict[str, Any], flag_settings: dict[str, Any]) -> EdgeConfig:
    """Defaults, overridden by the config file, overridden by flags (``None`` flags are unset)."""
    merged = {**file_settings, **{k: v for k, v in flag_settings.items() if v is not None}}
    return EdgeConfig(**merged).validate()
