# The README's two set-up commands are `make demo` and `make test`; .ci/run calls `make test`.
PY ?= python3
PIP := $(PY) -m pip install --disable-pip-version-check -q

.PHONY: setup demo test wheel-check

setup:
	$(PIP) torch==2.13.0          # the CPU wheel on these machines; a loose pin pulls a CUDA build
	$(PIP) -e '.[test]'

demo: setup
	embxfer demo

test: setup
	$(PY) -m pytest -q

# Build the wheel, install it in a fresh venv and check imports, the CLI and mypy there.
wheel-check:
	bash .ci/wheel-check
