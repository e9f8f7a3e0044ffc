# Two commands for a new user: `make demo` and `make test`. Both set up what they need first
# (idempotent: a second call skips what is done).

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

# Offline by design: no telemetry from any tool; Prefect's temporary server gets time to start.
export DO_NOT_TRACK := true
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export MLFLOW_DISABLE_TELEMETRY := true
export DVC_NO_ANALYTICS := 1
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS := 120
export PREFECT_HOME ?= $(CURDIR)/.prefect

.PHONY: setup labelstudio-install labelstudio-start labelstudio-stop demo baseline test test-unit \
        test-integration lint test-team-faults test-fault-drills \
        bench bench-quick bench-lesions server-start server-stop webhook clean clean-all

setup: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	@$(PYTHON) -c "import ensurepip" 2>/dev/null || { echo "$(PYTHON) cannot create virtualenvs: install venv support (Debian/Ubuntu: apt install python3-venv), or run make PYTHON=/path/to/python3.11"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps -e .
	touch $@

labelstudio-install:
	PYTHON=$(PYTHON) bash infra/labelstudio.sh install

labelstudio-start: labelstudio-install
	bash infra/labelstudio.sh start

labelstudio-stop:
	bash infra/labelstudio.sh stop

baseline: setup
	$(VENV)/bin/xbl baseline

# make demo DATASET=decoy-lesions: the loop on RGB lesions with a ResNet-18 (demos/*.yaml)
demo: setup labelstudio-install
	$(VENV)/bin/xbl demo $(if $(DATASET),--dataset $(DATASET))

# Chromium for tests/integration/test_browser.py, from the system's packages: Playwright downloads no
# browser. Nothing to do when /usr/bin/chromium exists. Without root and apt-get, or when the
# install fails, the test skips; under CI a failed install stops `make test`.
.PHONY: browser-install
browser-install:
	@if [ -x /usr/bin/chromium ]; then \
		true; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
			--no-install-recommends chromium fonts-liberation; } \
		|| { [ -z "$$CI" ] && echo "browser-install: apt-get could not install chromium: tests/integration/test_browser.py will skip"; }; \
	else \
		echo "browser-install: no /usr/bin/chromium, and installing it needs root and apt-get: tests/integration/test_browser.py will skip"; \
	fi

# make test: lint, then tests/unit/ and tests/integration/ (the latter start Prefect, MLflow, DVC,
# Label Studio, PostgreSQL and a browser). make test-unit: the code alone, for the inner loop.
test: lint labelstudio-install browser-install
	$(PY) -m pytest -q -p no:cacheprovider --durations=15 tests

test-unit: setup
	$(PY) -m pytest -q -p no:cacheprovider --durations=5 tests/unit

test-integration: setup labelstudio-install browser-install
	$(PY) -m pytest -q -p no:cacheprovider --durations=15 tests/integration

# Load and faults on the team path (20 concurrent annotators, a killed worker, a PostgreSQL
# restart): about 6 minutes, so not part of `make test`.
test-team-faults: labelstudio-install
	XBL_TEAM_FAULTS=1 $(PY) -m pytest -q -p no:cacheprovider tests/integration/test_team_faults.py

# The process killed mid-step (during the push, the mask writing, between `dvc add` and `dvc push`,
# during MLflow logging and in promotion), then run again: about a minute a drill on a quiet machine,
# 8 to 15 minutes with the reference run and the drill between steps: not part of `make test`.
test-fault-drills: labelstudio-install
	XBL_FAULT_DRILLS=1 $(PY) -m pytest -q -p no:cacheprovider tests/integration/test_faults.py

# ruff: lint rules and the formatter's check, as configured in pyproject.toml
lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# The benchmarks write bench/results/*.{json,md,png}; on 2 CPU cores efficacy takes ~40 min, cost
# about 75 min (timings need a quiet machine: bench/cost.py flags a disturbed table), stream ~10 min; propagation runs decoy-digits and
# decoy-lesions side by side (one core each, ~22 min on shared cores, settings cut to fit; each
# writes its part, the report joins them; the defaults run the full grid).
bench: setup
	$(PY) -m bench.throughput
	$(PY) -m bench.stream
	$(PY) -m bench.cost
	$(PY) -m bench.efficacy
	$(PY) -m bench.propagation --datasets decoy-digits --tasks 5 --lean-tasks 1 --candidates 0,4 \
		--imperfect wrong --imperfect-strategies random --no-reference & \
	$(PY) -m bench.propagation --datasets decoy-lesions --lesion-seeds 0 --tasks 10 --lean-tasks 1 \
		--candidates 0,4 --imperfect wrong --imperfect-strategies random; wait
	$(PY) -m bench.propagation --report-only

# decoy-lesions with a ResNet-18 (bench/lesions.py): about an hour per seed on 2 quiet CPU cores
bench-lesions: setup
	$(PY) -m bench.lesions

bench-quick: setup
	$(PY) -m bench.efficacy --quick --out-dir bench/results/quick

server-start: setup
	$(VENV)/bin/xbl server start

server-stop:
	$(VENV)/bin/xbl server stop

webhook: setup
	$(VENV)/bin/xbl webhook

# clean: this project's runs, tracking store and prepared data. It keeps Label Studio's data
# (projects, tasks, annotations), the annotators' masks (data/feedback/), the rounds' queries and
# reports (data/rounds/), your data (data/raw/), DVC's cache and remote, and exports/: a later run
# sees rounds that the wiped MLflow store no longer knows, keeps their annotations and opens a
# new round.
clean:
	@echo "removing: runs/, the MLflow store (mlflow.db, mlartifacts/), .prefect/, data/prepared/"
	@echo "keeping:  Label Studio's data (.labelstudio/data), data/feedback/, data/rounds/, data/raw/, the DVC cache and remote, exports/ (make clean-all removes Label Studio's data too)"
	rm -rf runs mlflow.db mlartifacts .prefect data/prepared

# clean-all: both stores, for a fresh start: also the local Label Studio's projects and
# annotations (its install and credentials stay), the rounds' queries and the webhook receiver's
# record of deliveries (Label Studio's ids start again at 1). Nothing an annotator made is
# deleted: first every project, task and annotation of the local Label Studio is exported through
# its API to exports/labelstudio-<UTC time>.json (the server is started for it), and the masks
# (data/feedback/) move to exports/feedback-<UTC time>/. When Label Studio has data and the
# export fails, nothing is removed.
LS_HOME ?= $(or $(XBL_LABEL_STUDIO_HOME),.labelstudio)
LS_ENV   = XBL_LABEL_STUDIO_HOME=$(abspath $(LS_HOME))
NOW     := $(shell date -u +%Y%m%d-%H%M%S)
clean-all:
	@if [ -e "$(LS_HOME)/data" ]; then \
		echo "exporting the local Label Studio's projects, tasks and annotations ($(LS_HOME)/data) first"; \
		refuse() { echo "clean-all: nothing removed: $$1" >&2; exit 1; }; \
		[ -x "$(PY)" ] || refuse "exporting $(LS_HOME)/data needs the venv: run make setup"; \
		$(LS_ENV) bash infra/labelstudio.sh start \
			|| refuse "Label Studio did not start, so $(LS_HOME)/data could not be exported"; \
		env -u LABEL_STUDIO_URL $(LS_ENV) $(PY) -m services.export --out-dir exports --stamp $(NOW) \
			|| refuse "the export of $(LS_HOME)/data failed (above)"; \
	fi
	@$(MAKE) --no-print-directory clean
	@if [ -e data/feedback ] || [ -e data/feedback.dvc ]; then \
		mkdir -p exports/feedback-$(NOW) && { [ -e exports/.gitignore ] || echo '*' > exports/.gitignore; } && \
		for f in data/feedback data/feedback.dvc; do [ ! -e $$f ] || mv $$f exports/feedback-$(NOW)/; done && \
		echo "moved:    data/feedback/ and data/feedback.dvc (every round's masks) to exports/feedback-$(NOW)/"; \
	fi
	@echo "removing: Label Studio's data ($(LS_HOME)/data): every project, task and annotation;"
	@echo "          data/rounds/, .xbl-webhook/"
	$(LS_ENV) bash infra/labelstudio.sh stop
	rm -rf $(LS_HOME)/data data/rounds .xbl-webhook
