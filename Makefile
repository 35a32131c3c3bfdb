# lrpet_mm — set-up, tests and demo. Everything installs into .venv (idempotent).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.lrpet_installed

.PHONY: install test demo

install: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip 'setuptools<70' wheel ninja
	$(PIP) install -q torch==2.5.1 torchvision==0.20.1
	@# mmcv 2.1.0 ships only sources on PyPI: compile its CPU ops against the installed torch
	@# (about 10 min on 2 cores the first time; pip caches the built wheel afterwards).
	$(PY) -c "import mmcv.ops" 2>/dev/null || \
	  MMCV_WITH_OPS=1 FORCE_CUDA=0 MAX_JOBS=2 $(PIP) install --no-build-isolation mmcv==2.1.0
	$(PIP) install -q -r requirements.txt
	@# workaround: mmdeploy 1.3.1 declares protobuf<=3.20.2, which conflicts with the onnx pin;
	@# install it without its declared dependencies (the runtime ones are in requirements.txt)
	$(PIP) install -q --no-deps mmdeploy==1.3.1
	$(PIP) install -q --no-build-isolation --no-deps -e .
	$(PY) -c "import mmcv.ops, mmdet, mmseg, mmdeploy.apis, lrpet_mm; print('stack OK')"
	touch $(STAMP)

test: install
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q tests

demo: install
	$(PY) tools/demo.py
