# The two commands of the README. Each creates the virtual environment when it is missing.
VENV  ?= .venv
PY    := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: demo test bench reproduce venv clean

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

clean:
	rm -rf $(VENV) runs outputs
