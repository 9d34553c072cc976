# One-command entry points for a fresh machine. Each target sets up .venv first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup system-tools browser-tools data train demo search app test faults lint format clean

setup: system-tools $(STAMP)

# The Debian packages in $$missing (set by the recipe before it), installed with apt-get when
# run as root ($(1): what for); otherwise a note ($(2): what needs what) with the command
# ($(3) after it).
define install_missing
if [ -z "$$missing" ]; then exit 0; fi; \
if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	echo "Installing$$missing ($(1))"; \
	apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq$$missing >/dev/null; \
else \
	echo "note: $(2); install$$missing (Debian/Ubuntu: sudo apt-get install$$missing$(3))" >&2; \
fi
endef

# RAR unpackers for the data set's archive (unar first, bsdtar from libarchive-tools as the
# fallback, see docs/data.md).
system-tools:
	@missing=""; \
	command -v unar >/dev/null 2>&1 || missing="$$missing unar"; \
	command -v bsdtar >/dev/null 2>&1 || missing="$$missing libarchive-tools"; \
	$(call install_missing,to unpack the data set's RAR archive,unpacking the data set's RAR \
		archive needs unar or bsdtar,; macOS: brew install unar)

# Debian's Chromium and its driver, for the test that drives the inspector's page in a real
# browser (tests/test_app.py; skipped without them, except under CI=true).
browser-tools:
	@missing=""; \
	command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
		missing="$$missing chromium"; \
	command -v chromedriver >/dev/null 2>&1 || missing="$$missing chromium-driver"; \
	$(call install_missing,the browser test of the inspector's page,the browser test of the \
		inspector's page needs Chromium and chromedriver,)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e ".[dev,timm,mlflow,app,submitit]"
	touch $(STAMP)

# download (resumable), verify and unpack the data set into data/concrete_crack/ (a no-op once
# done); offline: make data ARGS="archive=/path/to/Concrete Crack Images for Classification.rar"
# (the same as .venv/bin/crack-data download)
data: setup
	$(PY) -m crack_lightning.commands.data download $(ARGS)

# the main job: MobileNetV2 on the real data set in data/concrete_crack/ (see README)
train: setup
	$(PY) train.py model=mobilenetv2 trainer.max_epochs=10 $(ARGS)

# offline demo on synthetic images, no download
demo: setup
	$(PY) train.py experiment=demo $(ARGS)

# hyper-parameter search with Optuna, 20 trials (docs/training.md "Hyper-parameter search")
search: setup
	$(PY) train.py hparams_search=optuna $(ARGS)

# the inspector's page (docs/app.md): make app ARGS="ckpt_path=RUN/checkpoints/best.ckpt"
app: setup
	$(PY) -m crack_lightning.commands.app $(ARGS)

test: setup browser-tools
	$(PY) -m pytest $(ARGS)

# fault injection (slow, not part of `make test`): SIGKILL training at random moments, resume
# with ckpt_path=last, check every run ends at the same epoch with loadable checkpoints
faults: setup
	$(PY) -m tests.faults $(ARGS)

lint: setup
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .

format: setup
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean:
	rm -rf .cache .pytest_cache .ruff_cache logs
