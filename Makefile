# lungseg: two commands. `make demo` runs the main job; `make test` runs the whole suite.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO ?= demo-output

.PHONY: demo test setup lint clean fuzz soak integration bench

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e ".[train,cluster,dev]"
	touch $@

setup: $(VENV)/.installed

lint: setup
	$(VENV)/bin/ruff check .

test: setup lint
	$(VENV)/bin/pytest -q

demo: setup
	@test -f models/default/model.onnx || { \
	  echo "make demo: no trained default model in models/default/ yet."; \
	  echo "Train one with lungseg-train (see README) or pass a bundle to lungseg-edge --model."; exit 1; }
	rm -rf $(DEMO)
	$(PY) -m lungseg.edge_runtime.samples $(DEMO)/incoming
	$(VENV)/bin/lungseg-edge run --once --watch $(DEMO)/incoming --out $(DEMO)/out --state $(DEMO)/state --backend auto
	$(VENV)/bin/lungseg-edge render --first $(DEMO)/out --out $(DEMO)/overlay.png
	@echo "Outputs: $(DEMO)/out (Secondary Capture + JSON sidecars); preview: $(DEMO)/overlay.png"

# the DICOM chain: storescu -> lungseg-edge SCP -> segmentation -> Orthanc (Debian: orthanc orthanc-dicomweb dcmtk)
integration: setup
	@command -v Orthanc >/dev/null && command -v storescu >/dev/null || { \
	  echo "make integration: needs the Debian packages orthanc, orthanc-dicomweb and dcmtk (see .ci/run)"; exit 2; }
	$(PY) tests/orthanc_chain.py --count 50

# robustness harness (edge_runtime/harness.py): one summary line each, exit 1 when a check fails
FUZZ_INPUTS ?= 2000
SOAK_FILES ?= 300
SOAK_KILLS ?= 15
fuzz: setup
	$(PY) -m lungseg.edge_runtime.harness fuzz --inputs $(FUZZ_INPUTS) --memory-limit 1500000000

soak: setup
	$(PY) -m lungseg.edge_runtime.harness soak --files $(SOAK_FILES) --kills $(SOAK_KILLS)

# one lungseg-bench run -> $(BENCH_OUT)/; fails (exit 1 parity, 3 an acceptance row) when its verdict does.
# BENCH_ARGS passes more options, e.g. BENCH_ARGS="--bound uncompressed_ratio=1.0" on a loaded machine.
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
