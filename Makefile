# lungseg: two commands. `make demo` runs the main job; `make test` runs the whole suite.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO ?= demo-output

.PHONY: demo test setup lint clean

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e ".[train,dev]"
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

clean:
	rm -rf $(VENV) $(DEMO) build *.egg-info
