# The README's two set-up commands are `make demo` and `make test`; .ci/run calls `make test`.
PY ?= python3
PIP := $(PY) -m pip install --disable-pip-version-check -q

.PHONY: system-deps setup demo test wheel-check

# Mooncake's engine.so links libibverbs (and libnuma, libcurl); tests/test_netns.py runs the two
# sides in network namespaces with iproute2's `ip` and `tc`.  Debian packages, root only.
system-deps:
	@if command -v apt-get >/dev/null && ! dpkg -s libibverbs1 libnuma1 libcurl4 iproute2 >/dev/null 2>&1; then \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libibverbs1 libnuma1 libcurl4 iproute2 >/dev/null; \
	fi

setup: system-deps
	$(PIP) torch==2.13.0          # the CPU wheel on these machines; a loose pin pulls a CUDA build
	$(PIP) -e '.[test,mooncake-cpu,progress]'

demo: setup
	embxfer demo

test: setup
	$(PY) -m pytest -q -rs

# Build the wheel, install it in a fresh venv and check imports, the CLI and mypy there.
wheel-check:
	bash .ci/wheel-check
