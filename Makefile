# The two commands of the README. Each creates the virtual environment when it is missing.
VENV  ?= .venv
PY    := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: demo test bench reproduce venv clean image

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The CPU wheel first: with torch==2.13.0 already present, nothing below pulls a CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(PY) -m pipelines.main $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -q $(ARGS)

reproduce: $(STAMP)
	$(PY) -m experiments.reproduce $(ARGS)

bench: $(STAMP)
	$(PY) -m benchmarks.table $(ARGS)

# The cluster image (Dockerfile; k8s/README.md). Its tag = k8s/spec.py's IMAGE_TAG (tests/k8s/test_image.py).
IMAGE ?= sfo-ray:2.60.0-py311-cu128
image:
	@docker info >/dev/null 2>&1 || { echo "make image: no Docker here (docker missing or its daemon not running); on a machine with Docker run: docker build -t $(IMAGE) ." >&2; exit 1; }
	docker build -t $(IMAGE) .

clean:
	rm -rf $(VENV) runs outputs
