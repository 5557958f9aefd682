# make demo: run the demo on example_shards/.  make test: run the test suite.  make docs: build the site into site/.
# Both create .venv on first use; torch is pinned to the CPU build through constraints.txt.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test docs bench stress clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt torch==2.13.0
	$(PY) -m pip install --quiet -c constraints.txt -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/wdsrefresh demo

test: $(STAMP)
	$(PY) -m pytest -q --durations=15 -n 2 --dist loadgroup

docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict  # the variable: no notice from Material about MkDocs 2

bench: $(STAMP)
	$(PY) tools/bench.py

clean:
	rm -rf $(VENV) build site *.egg-info
