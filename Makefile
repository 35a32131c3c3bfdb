# lrpet_mm — set-up, tests and demo. Everything installs into .venv (idempotent).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.lrpet_installed

.PHONY: install test test-fast demo test-compat

install: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip 'setuptools<70' wheel ninja packaging
	$(PIP) install -q torch==2.5.1 torchvision==0.20.1
	@# mmcv 2.1.0 ships only sources on PyPI: compile its ops against the installed torch, CPU
	@# ops (about 10 min on 2 cores the first time; that build is kept per torch version), or
	@# CUDA ops when torch sees a GPU, after checking for an nvcc of torch's CUDA version
	@# (tools/install_mmcv.py, docs/install.md; jobs: the cores, or $$MAX_JOBS)
	PYTHONPATH=. $(PY) tools/install_mmcv.py
	$(PIP) install -q -r requirements.txt
	@# workaround: mmdeploy 1.3.1 declares protobuf<=3.20.2, which conflicts with the onnx pin;
	@# install it without its declared dependencies (the runtime ones are in requirements.txt)
	$(PIP) install -q --no-deps mmdeploy==1.3.1
	$(PIP) install -q --no-build-isolation --no-deps -e .
	$(PY) -c "import mmcv.ops, mmdet, mmseg, mmdeploy.apis, lrpet_mm; print('stack OK')"
	$(PY) tools/collect_env.py --check
	touch $(STAMP)

test: install
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q --durations=15 tests

# the fast tier: everything but the tests that drive a runner (a training), a subprocess tool or
# a benchmark, or build full-size models (marker `slow`); under 2 minutes once installed
test-fast: install
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q -m 'not slow' tests

demo: install
	$(PY) tools/demo.py

# A second stack, checked by `make test-compat` (not part of `make test`): torch 2.1.2 /
# torchvision 0.16.2, mmcv 2.1.0 compiled here, mmengine 0.10.7, mmdet 3.3.0, mmsegmentation 1.2.2
# (requirements-compat.txt) in .venv-compat; lrpet_mm is installed into it as docs/install.md
# says (`pip install '.[det,seg,test]'`, under those pins), then COMPAT_TESTS run there.
COMPAT_VENV  := .venv-compat
COMPAT_PY    := $(COMPAT_VENV)/bin/python
COMPAT_STAMP := $(COMPAT_VENV)/.lrpet_stack_installed
COMPAT_PINS  := PIP_CONSTRAINT=$(CURDIR)/requirements-compat.txt
# core (projection math, factorization, BN recovery, conv-BN pairing), the hook, resume, the
# factorize tool with the upstream test.py, the environment checks, the GPU check's tests
# (skipped without a GPU)
COMPAT_TESTS ?= tests/test_lowrank_math.py tests/test_projection.py tests/test_factorize_conv.py \
	tests/test_bn_recovery.py tests/test_target_pairing.py tests/test_core_is_pure_torch.py \
	tests/test_hook_schedule.py tests/test_lrpet_hook.py tests/test_resume.py \
	tests/test_factorize_tool.py tests/test_environment.py tests/test_gpu_check.py \
	tests/test_cuda.py tests/test_whole_model_planning.py

$(COMPAT_STAMP): requirements-compat.txt
	test -x $(COMPAT_PY) || $(PYTHON) -m venv $(COMPAT_VENV)
	$(COMPAT_PY) -m pip install -q --upgrade pip 'setuptools<70' wheel ninja packaging
	$(COMPAT_PINS) $(COMPAT_PY) -m pip install -q torch torchvision numpy
	$(COMPAT_PINS) PYTHONPATH=. $(COMPAT_PY) tools/install_mmcv.py
	$(COMPAT_PINS) $(COMPAT_PY) -m pip install -q -r requirements-compat.txt
	touch $(COMPAT_STAMP)

test-compat: $(COMPAT_STAMP)
	@# a fresh, non-editable install of this checkout (build/ may hold modules since removed)
	rm -rf build
	$(COMPAT_PY) -m pip uninstall -q -y lrpet_mm 2>/dev/null || true
	$(COMPAT_PINS) $(COMPAT_PY) -m pip install -q '.[det,seg,test]'
	$(COMPAT_PY) tools/collect_env.py --check
	@# bin/pytest (not python -m pytest, which puts the checkout first on sys.path): the tests
	@# import the installed lrpet_mm
	$(COMPAT_VENV)/bin/pytest -q $(COMPAT_TESTS)
