# lungseg: two commands. `make demo` runs the main job on the runtime install alone (no torch, Ray, pytest
# or ruff); `make test` adds the [train,cluster,dev] extras and runs the suite but its performance tier.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO ?= demo-output

.PHONY: demo test setup lint clean fuzz soak integration bench test-py310

# the runtime: `pip install -e .`, what an edge box runs
$(VENV)/.runtime: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -c constraints.txt -e .
	touch $@

# the demo's and the harness's sample DICOMs (pydicom-data's RG1 files: data only)
$(VENV)/.samples: $(VENV)/.runtime
	$(PY) -m pip install -q pydicom-data
	touch $@

# development: the runtime + training, Ray, pytest, ruff (torch pinned to a CPU build by constraints.txt), and
# OpenVINO + NNCF so the OpenVINO backend's tests run (openvino wheel 59 MB, ~180 MB installed; nncf 0.8 MB + scipy,
# scikit-learn)
$(VENV)/.installed: $(VENV)/.runtime pyproject.toml constraints.txt
	$(PY) -m pip install -q -c constraints.txt -e ".[train,cluster,dev,openvino-export]"
	touch $@

setup: $(VENV)/.installed

# ruff; the import layers of pyproject.toml (import-linter, which sees imports inside functions too);
# mypy on the core, the torch layer and the edge runtime
lint: setup
	$(VENV)/bin/ruff check .
	$(PY) tests/tools/check_layers.py
	$(PY) tests/tools/typecheck.py

# unit + integration + short robustness; the performance tier (timing ratios) runs on its own: pytest -m performance
test: setup lint
	$(VENV)/bin/pytest -q -m "not performance"

# the same tiers on Python 3.10 (JetPack 6), in its own venv, without the [train] extra (torch tests skip, saying so)
PY310 ?= python3.10
VENV310 ?= $(VENV)/py310
$(VENV310)/.installed: pyproject.toml constraints.txt
	$(PY310) -m venv $(VENV310)
	$(VENV310)/bin/python -m pip install -q -c constraints.txt -e ".[dev]"
	touch $@

test-py310: $(VENV310)/.installed
	$(VENV310)/bin/pytest -q -m "not performance"

demo: $(VENV)/.samples
	@test -f models/default/model.onnx || { \
	  echo "make demo: no trained default model in models/default/ yet."; \
	  echo "Train one with lungseg-train (see README) or pass a bundle to lungseg-edge --model."; exit 1; }
	rm -rf $(DEMO)
	$(PY) -m lungseg.edge_runtime.samples $(DEMO)/incoming
	$(VENV)/bin/lungseg-edge run --once --watch $(DEMO)/incoming --out $(DEMO)/out --state $(DEMO)/state --backend auto
	$(VENV)/bin/lungseg-edge render --first $(DEMO)/out --out $(DEMO)/overlay.png
	@echo "Outputs: $(DEMO)/out (Secondary Capture, SEG, SR + JSON sidecars); preview: $(DEMO)/overlay.png"

# the DICOM chain: storescu -> lungseg-edge SCP -> segmentation -> Orthanc (Debian: orthanc orthanc-dicomweb dcmtk)
integration: setup
	@command -v Orthanc >/dev/null && command -v storescu >/dev/null || { \
	  echo "make integration: needs the Debian packages orthanc, orthanc-dicomweb and dcmtk (see .ci/run)"; exit 2; }
	$(PY) tests/orthanc_chain.py --count 50
	$(PY) tests/orthanc_chain.py --count 10 --tls  # every DICOM hop on mutual TLS (certificates made for the run)

# robustness harness (tests/harness.py, a test tool outside the package): one summary line each, exit 1 when a
# check fails. It needs the runtime only (and pydicom-data's files as seeds).
FUZZ_INPUTS ?= 2000
SOAK_FILES ?= 300
SOAK_KILLS ?= 15
fuzz: $(VENV)/.samples
	$(PY) tests/harness.py fuzz --inputs $(FUZZ_INPUTS) --memory-limit 1500000000

soak: $(VENV)/.samples
	$(PY) tests/harness.py soak --files $(SOAK_FILES) --kills $(SOAK_KILLS)

# one lungseg-bench run -> $(BENCH_OUT)/; fails (exit 1 parity, 3 an acceptance row) when its verdict does.
# BENCH_ARGS passes more options, e.g. BENCH_ARGS="--bound uncompressed_vs_yardstick=2.0" on a loaded machine.
BENCH_OUT ?= bench-output
BENCH_ARGS ?=
bench: setup
	$(VENV)/bin/lungseg-bench --model models/default --data ../shared/data/cxr/manifest.csv \
	  --dicom ../shared/data/dicom --json $(BENCH_OUT)/cpu.json --markdown $(BENCH_OUT)/cpu.md \
	  --plot $(BENCH_OUT)/latency.png $(BENCH_ARGS)

# a separate, explicit step: that run -> docs/benchmarks/ and the README's performance section
.PHONY: bench-publish
bench-publish: setup
	$(PY) -m lungseg.benchmarks.readme --json $(BENCH_OUT)/cpu.json --docs docs/benchmarks --readme README.md

clean:
	rm -rf $(VENV) $(DEMO) build *.egg-info
