# Every target makes .venv itself from pyproject.toml on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# What gpu-check installs first: `make gpu-check PY=python3 SETUP=` runs it in an environment
# that already holds torch for the card (and qlab's other packages) instead of making .venv.
SETUP ?= $(STAMP)

.PHONY: demo test test-slow test-realdata test-cross test-all bench lint gpu-check

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)  ## FP32 -> PTQ -> QAT -> report -> integer model, on the offline synthetic data (outputs/demo/)
	$(PY) train.py stage=fp32 experiment=demo name=demo overwrite=true
	$(PY) quantize.py stage=ptq experiment=demo name=demo
	$(PY) train.py stage=qat experiment=demo name=demo overwrite=true
	$(PY) quantize.py stage=report experiment=demo name=demo
	$(PY) quantize.py stage=integer experiment=demo name=demo from=qat

test: $(STAMP)  ## fast tests, then the 2-process DDP tests, the slow ones and the real-image ones
	$(PY) -m pytest -q
	$(PY) -m pytest -q -m "ddp or slow or realdata or cross"

test-slow: $(STAMP)  ## minutes: the end-to-end CLI runs, QAT resume, the testbed quantization guard
	$(PY) -m pytest -q -m slow

test-realdata: $(STAMP)  ## needs ../shared/data/cifar10-jpeg.tar.gz
	$(PY) -m pytest -q -m realdata

CROSS_PACKAGES := gcc-aarch64-linux-gnu libc6-dev-arm64-cross qemu-user
test-cross: $(STAMP)  ## the C model built for aarch64 (Raspberry Pi, Jetson) and run under qemu; installs both (Debian, root)
	@command -v aarch64-linux-gnu-gcc >/dev/null && command -v qemu-aarch64 >/dev/null || \
	  { command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] && \
	    apt-get install -y --no-install-recommends $(CROSS_PACKAGES) >/dev/null; } || \
	  { echo "test-cross needs aarch64-linux-gnu-gcc and qemu-aarch64: apt-get install $(CROSS_PACKAGES) (as root)"; exit 1; }
	$(PY) -m pytest -q -m cross

test-all: test test-slow test-realdata test-cross

bench: $(STAMP)  ## speed tables (benchmarks/results/*.json); QUICK=1 for fewer runs
	$(PY) benchmarks/inference.py $(if $(QUICK),--runs 100 --batch-iters 1 --rounds 3,)
	$(PY) benchmarks/train.py $(if $(QUICK),--steps 3,)
	$(PY) benchmarks/augment.py $(if $(QUICK),--images 1024,)
	$(PY) benchmarks/ptq_cost.py $(if $(QUICK),--calib-batches 4,)
	$(PY) benchmarks/integer.py $(if $(QUICK),--images 1000,)

gpu-check: $(SETUP)  ## CUDA only: short FP32 -> PTQ -> QAT -> report on every GPU (outputs/gpu-check/)
	@$(PY) -c "import sys, torch; torch.cuda.is_available() or sys.exit('make gpu-check needs a CUDA GPU; torch.cuda.is_available() is False here.')"
	$(PY) train.py stage=fp32 experiment=gpu_check name=gpu-check overwrite=true
	$(PY) quantize.py stage=ptq experiment=gpu_check name=gpu-check
	$(PY) train.py stage=qat experiment=gpu_check name=gpu-check overwrite=true
	$(PY) quantize.py stage=report experiment=gpu_check name=gpu-check
	@$(PY) -c "import json; [print(s, m['hardware']['gpus'], 'precision', m['precision'], 'world size', m['world_size'], f\"{m['train_images_per_s']:.0f} train img/s\") for s in ('fp32', 'qat') for m in [json.load(open(f'outputs/gpu-check/{s}/metrics.json'))]]"

lint: $(STAMP)
	$(PY) -m ruff check qlab tests benchmarks train.py quantize.py
