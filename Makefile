# gtnkit: `make test` and `make demo` work on a fresh clone by themselves.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# The torch pin served from this project's local package mirror (other versions download GBs).
TORCH  := torch==2.14.1 torchvision==0.29.1
STAMP  := $(VENV)/.gtnkit-installed
RUN    := $(VENV)/.gtnkit-run
DEMO   ?= runs/demo

.PHONY: install install-run lint test test-kernels test-fast test-gpu demo demo-cifar10 demo-coreset bench-smoke clean

# install: everything (the test tools and Ray too); install-run: what running gtnkit needs
# (torch, gtnkit, matplotlib), the demos' dependency, about 25 s less to install. One pip call,
# no byte-compiling of every installed file (Python compiles what it imports, once): on a
# 2-core EPYC 78 s -> 55 s for install-run.
PIP    := $(BIN)/python -m pip install -q --no-compile
install: $(STAMP)
install-run: $(RUN)

$(RUN): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) $(TORCH) -e '.[plot]'
	touch $(RUN)

$(STAMP): $(RUN)
	$(PIP) -e '.[test,plot,ray]'
	touch $(STAMP)

# Lint (ruff: pyflakes, pycodestyle, isort, pyupgrade, bugbear, annotations) and type-check
# the library (mypy); both configured in pyproject.toml, seconds each.
lint: install
	$(BIN)/ruff check .
	$(BIN)/mypy

# The whole suite; real-data tests run when GTNKIT_DATA points at the data (CI sets it).
# pytest exits 5 when it collects nothing: that is a failure of this target too.
# Then the determinism tests (two runs made in the test, compared bit for bit) again under a
# second CPU kernel configuration: the portable kernels, with 1 and with 2 threads.
test: install
	$(BIN)/python -m pytest -q
	$(MAKE) --no-print-directory test-kernels

test-kernels: install
	ATEN_CPU_CAPABILITY=default OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -m determinism -p no:cacheprovider
	ATEN_CPU_CAPABILITY=default OMP_NUM_THREADS=2 $(BIN)/python -m pytest -q -m determinism -p no:cacheprovider

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow and not realdata"

# The CUDA tests (marked cuda): each is skipped, saying why, where no CUDA device is present.
test-gpu: install
	$(BIN)/python -m pytest -q -m cuda -rs

# The main job: a GTN trained by unrolled backprop, implicit differentiation and gradient
# matching, compared by peak memory and seconds per meta-step at T = 8, 16, 32, 64 (2
# meta-iterations each) and by student accuracy at T = 10 after 300 meta-iterations (demo
# budget; its scored cells' real-data side compiled on MNIST, eager on CIFAR-10, where the
# compilation costs more than it saves in 300 meta-iterations); cells in 2 processes; on an
# idle 2-core AMD EPYC from a fresh clone, install included: 8-11 min (MNIST; the VM's speed
# varies by day), 11 (demo-cifar10).
# Downloads the data through torchvision unless GTNKIT_DATA points at a root that holds it.
DEMO_COMPARE := gtn compare --budget demo --methods unrolled,first-order-tail,matching \
	--inner-steps 8,16,32,64 --executor local --workers 2 --download --force

demo: install-run
	$(BIN)/gtnkit $(DEMO_COMPARE) --dataset mnist --out $(DEMO)/gtn-compare

demo-cifar10: install-run
	$(BIN)/gtnkit $(DEMO_COMPARE) --no-compile --dataset cifar10 --out $(DEMO)/gtn-compare-cifar10

# Select a coreset of MNIST (herding, 10 per class) and evaluate it.
demo-coreset: install-run
	$(BIN)/gtnkit select --dataset mnist --method herding --ipc 10 --download \
	    --pool-per-class 500 --signal-epochs 5 --out $(DEMO)/select --force
	$(BIN)/gtnkit evaluate $(DEMO)/select --students 2 --download \
	    --out $(DEMO)/evaluate --force
	$(BIN)/gtnkit show $(DEMO)/select --out $(DEMO)/show --force

bench-smoke: install
	$(BIN)/python bench/coreset.py --budget smoke

clean:
	rm -rf $(VENV) runs .pytest_cache
