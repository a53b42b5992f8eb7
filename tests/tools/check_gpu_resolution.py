"""Check what pip resolves for the GPU install on x86-64, for Python 3.10, 3.11 and 3.12.

Runs ``pip install --dry-run --ignore-installed --report -`` (nothing is installed) and inspects the resolved set:

1. the ``tensorrt-cu12`` front-end named by the ``[gpu]`` extra (the package that provides ``import tensorrt``;
   an sdist on PyPI, so resolved with ``--no-deps``) and the bindings/libs versions it pins: one version;
2. with ``--only-binary=:all:`` for the target Python: the bindings wheel of that version, cuda-python, and the
   onnxruntime-gpu requirement of packaging/INSTALL.md with its ``[cuda,cudnn]`` extras, so that every
   ``nvidia-*`` library it brings shows its CUDA major: all must be CUDA 12;
3. the ``tensorrt-cu12-libs`` wheel of that version, which PyPI holds only as a stub that downloads from
   pypi.nvidia.com: resolved against that index, or reported UNVERIFIED when it cannot be reached.

Usage: ``python tests/tools/check_gpu_resolution.py [--python 3.10 ...]``. Exit 0: all checks passed (UNVERIFIED
steps are printed, not failed, unless ``--strict``); 1: a check failed; 3: PyPI itself unreachable.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10: tomli, a base dependency there
    import tomli as tomllib

REPO_ROOT = Path(__file__).resolve().parents[2]
PYTHONS = ("3.10", "3.11", "3.12")
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "any")
NVIDIA_INDEX = "https://pypi.nvidia.com"
# The onnxruntime CUDA fallback as packaging/INSTALL.md installs it (it cannot be part of [gpu]: it and the base
# onnxruntime provide the same module). onnxruntime-gpu 1.19-1.26 on PyPI are CUDA 12 builds; 1.27+ are CUDA 13
# (their [cuda] extra asks for nvidia-cuda-runtime~=13.0 and nvidia-cudnn-cu13) - this check finds out again.
ORT_GPU_SPEC = "onnxruntime-gpu>=1.19,<1.27"
FRONT_END = "tensorrt-cu12"


class PipUnreachableError(RuntimeError):
    """PyPI (or another index) could not be reached."""


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def gpu_extra() -> list[str]:
    """The [gpu] extra's requirements from pyproject.toml."""
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    return list(project["optional-dependencies"]["gpu"])


def _dry_run(reqs: list[str], python: str, *, no_deps: bool, extra_index: str | None = None,
             timeout: float = 300) -> list[dict]:
    cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet", "--report", "-",
           "--disable-pip-version-check", "--python-version", python, "--implementation", "cp"]
    for plat in PLATFORMS:
        cmd += ["--platform", plat]
    cmd += ["--no-deps"] if no_deps else ["--only-binary=:all:"]
    if extra_index:
        cmd += ["--extra-index-url", extra_index]
    with tempfile.TemporaryDirectory() as target:  # pip < 24 takes --platform only with --target (nothing is written)
        proc = subprocess.run([*cmd, "--target", target, *reqs], capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        err = "\n".join(line for line in proc.stderr.splitlines() if not line.startswith("WARNING: Location"))
        if re.search(r"NewConnectionError|Temporary failure in name resolution|Network is unreachable|"
                     r"ConnectTimeout|ProxyError|Max retries exceeded", err):
            raise PipUnreachableError(err.strip().splitlines()[-1] if err.strip() else "no network")
        raise RuntimeError(f"pip could not resolve {reqs} for Python {python}:\n{err.strip()}")
    return list(json.loads(proc.stdout)["install"])


def _cuda_major(name: str, version: str) -> int | None:
    """CUDA major of an nvidia-* wheel: from a -cuNN suffix, else (CUDA 13 style names) its version."""
    m = re.search(r"-cu(\d+)$", name)
    if m:
        return int(m.group(1))
    if name in {"nvidia-cuda-runtime", "nvidia-cuda-nvrtc", "nvidia-nvjitlink", "nvidia-cublas"}:
        return int(version.split(".")[0])
    return None


def _req_cuda_majors(requires_dist: list[str]) -> set[int]:
    """CUDA majors named by a package's nvidia-* requirements (any extra)."""
    majors: set[int] = set()
    for req in requires_dist:
        m = re.match(r"\s*(nvidia-[A-Za-z0-9_.-]+)\s*(?:\[[^]]*\])?\s*([~=<>!]=?\s*[\d.]+)?", req)
        if not m:
            continue
        name = _norm(m.group(1))
        suffix = re.search(r"-cu(\d+)$", name)
        if suffix:
            majors.add(int(suffix.group(1)))
        elif m.group(2):
            majors.add(int(re.sub(r"[^\d.]", "", m.group(2)).split(".")[0]))
    return majors


def check_python(python: str, *, log: list[str]) -> tuple[list[str], list[str]]:
    """Resolve and check the GPU set for one Python; returns (failures, unverified)."""
    failures: list[str] = []
    unverified: list[str] = []
    extra = gpu_extra()
    front_specs = [r for r in extra if _norm(re.split(r"[\s;<>=!~\[]", r, maxsplit=1)[0]) == FRONT_END]
    if not front_specs:
        return [f"[gpu] names no {FRONT_END} front-end (the package that provides `import tensorrt`): {extra}"], []
    front_spec = front_specs[0].split(";")[0].strip()
    # 1. the front-end and the versions it pins
    (front,) = _dry_run([front_spec], python, no_deps=True)
    version = front["metadata"]["version"]
    pins = {}
    for req in front["metadata"].get("requires_dist") or []:
        m = re.match(r"\s*([A-Za-z0-9_.-]+)\s*==\s*([\w.]+)", req)
        if m:
            pins[_norm(m.group(1))] = m.group(2)
    log.append(f"{python}: {FRONT_END} {version} pins {pins}")
    for part in ("tensorrt-cu12-bindings", "tensorrt-cu12-libs"):
        if pins.get(part) != version:
            failures.append(f"{python}: {FRONT_END} {version} pins {part}=={pins.get(part)}, not {version}")
    others = [r.split(";")[0].strip() for r in extra if r not in front_specs
              and not _norm(re.split(r"[\s;<>=!~\[]", r, maxsplit=1)[0]).startswith("tensorrt")]
    stray = [r for r in extra if r not in front_specs and _norm(r).startswith("tensorrt")]
    if stray:
        failures.append(f"{python}: [gpu] names TensorRT parts beside the front-end (versions can drift): {stray}")
    # 2. bindings wheel, cuda-python, onnxruntime-gpu with its CUDA libraries
    ort_name, ort_rest = ORT_GPU_SPEC.split(">", 1)
    resolved = _dry_run([f"tensorrt-cu12-bindings=={version}", *others, f"{ort_name}[cuda,cudnn]>{ort_rest}"],
                        python, no_deps=False)
    got = {_norm(i["metadata"]["name"]): i for i in resolved}
    names = sorted(f"{n}=={i['metadata']['version']}" for n, i in got.items()
                   if n.startswith(("tensorrt", "nvidia", "onnxruntime", "cuda")))
    log.append(f"{python}: resolved {' '.join(names)}")
    bindings = got.get("tensorrt-cu12-bindings")
    if bindings is None or bindings["metadata"]["version"] != version:
        failures.append(f"{python}: no tensorrt-cu12-bindings {version} wheel")
    cuda_python = got.get("cuda-python")
    if cuda_python is None or not cuda_python["metadata"]["version"].startswith("12."):
        failures.append(f"{python}: cuda-python is not 12.x: {cuda_python and cuda_python['metadata']['version']}")
    ort = got.get("onnxruntime-gpu")
    if ort is None:
        failures.append(f"{python}: onnxruntime-gpu not resolved")
    else:
        majors = _req_cuda_majors(ort["metadata"].get("requires_dist") or [])
        log.append(f"{python}: onnxruntime-gpu {ort['metadata']['version']} asks for CUDA {sorted(majors)}")
        if majors != {12}:
            failures.append(f"{python}: onnxruntime-gpu {ort['metadata']['version']} targets CUDA {sorted(majors)}")
    for name, item in got.items():
        if name.startswith("nvidia-"):
            major = _cuda_major(name, item["metadata"]["version"])
            if major is not None and major != 12:
                failures.append(f"{python}: {name} {item['metadata']['version']} is CUDA {major}")
    # 3. the libs wheel, which only NVIDIA's index holds
    try:
        (libs,) = _dry_run([f"tensorrt-cu12-libs=={version}"], python, no_deps=True, extra_index=NVIDIA_INDEX,
                           timeout=120)
        url = libs["download_info"]["url"]
        log.append(f"{python}: tensorrt-cu12-libs {libs['metadata']['version']} from {url}")
        if libs["metadata"]["version"] != version or not url.endswith(".whl"):
            failures.append(f"{python}: tensorrt-cu12-libs {version}: no wheel ({url})")
    except (PipUnreachableError, RuntimeError, subprocess.TimeoutExpired) as exc:
        lines = str(exc).strip().splitlines() or ["?"]
        first = next((ln.strip() for ln in lines if re.search(r"ERROR|failed|not reachable|unreachable", ln)),
                     lines[-1])[:200]
        unverified.append(f"{python}: tensorrt-cu12-libs=={version} wheel not checked: {NVIDIA_INDEX} "
                          f"unreachable from here ({first})")
    return failures, unverified


def install_md_uses_spec() -> bool:
    """packaging/INSTALL.md installs the onnxruntime-gpu this check resolved."""
    return f'"{ORT_GPU_SPEC}"' in (REPO_ROOT / "packaging" / "INSTALL.md").read_text()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--python", action="append", help="Python version(s) to check (default 3.10 3.11 3.12)")
    parser.add_argument("--strict", action="store_true", help="fail on steps that could not be verified")
    args = parser.parse_args(argv)
    failures: list[str] = []
    unverified: list[str] = []
    log: list[str] = []
    if not install_md_uses_spec():
        failures.append(f'packaging/INSTALL.md does not install "{ORT_GPU_SPEC}"')
    try:
        for python in args.python or PYTHONS:
            f, u = check_python(python, log=log)
            failures += f
            unverified += u
    except PipUnreachableError as exc:
        print(f"PyPI unreachable: {exc}")
        return 3
    for line in log:
        print(line)
    for line in unverified:
        print("UNVERIFIED", line)
    for line in failures:
        print("FAIL", line)
    print("FAIL" if failures or (args.strict and unverified) else "OK")
    return 1 if failures or (args.strict and unverified) else 0


if __name__ == "__main__":
    sys.exit(main())
