# Every target creates or reuses .venv; `make install` reinstalls only when pyproject.toml or requirements.lock
# changes. It installs the tested set: pyproject.toml's ranges, constrained to requirements.lock's exact versions.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.stylegen-installed

.PHONY: install demo test lint bench device-check clean lock

install: $(STAMP)

$(STAMP): pyproject.toml requirements.lock
	test -x $(PY) || python3.11 -m venv $(VENV) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -c requirements.lock -e ".[test]"
	touch $(STAMP)

# The demo ends by writing the HTML report of what it made and printing its path (after the summary)
demo: install
	$(VENV)/bin/stylegen run configs/demo.yaml
	$(VENV)/bin/stylegen report out/demo

lint: install
	$(VENV)/bin/ruff check .

test: install lint
	@command -v chromium >/dev/null || command -v chromium-browser >/dev/null || { echo "installing chromium (Debian package) for the report render tests"; (apt-get update -qq && apt-get install -y -qq chromium) >/dev/null || { echo "error: cannot install chromium: run apt-get install -y chromium as root, then make test again" >&2; exit 1; }; }
	$(PY) -m pytest -q --durations=15

bench: install
	$(PY) benchmarks/run_all.py

# bf16 Sissi/AD checks on a CUDA GPU (exit 2 without one); never part of `make test`
device-check: install
	PYTHONPATH=. $(PY) benchmarks/device_check.py

# Rewrite requirements.lock from .venv after changing a dependency there and passing `make test` with it
lock: install
	$(PY) scripts/lock.py

clean:
	rm -rf out .pytest_cache
