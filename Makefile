# Two commands on a fresh machine:  `make demo`  and  `make test`.
# Both create .venv, install the CPU build of torch 2.13.0 and npas_fx with its extras, and make
# sure graphviz's `dot` is present (Debian package, installed with apt-get when missing).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test test-fast lint bench-overhead bench-accuracy clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test,bench]'
	@command -v dot >/dev/null || { \
	  echo "installing graphviz (dot) with apt-get"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq graphviz >/dev/null; }
	touch $(STAMP)

demo: $(STAMP)
	$(PY) examples/digits_cnn.py

lint: $(STAMP)
	$(VENV)/bin/ruff check npas_fx tests examples benchmarks
	$(VENV)/bin/ruff format --check npas_fx tests examples benchmarks

# The whole suite, slow torch.compile cases included (what CI runs).
test: lint
	$(PY) -m pytest -q

# Everything but the cases marked slow, for quick iterations.
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

bench-overhead: $(STAMP)
	$(PY) benchmarks/overhead.py

bench-accuracy: $(STAMP)
	$(PY) benchmarks/accuracy.py

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .hypothesis
