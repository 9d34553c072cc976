# One-command entry points for a fresh machine. Each target sets up .venv first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup train demo test lint format clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e ".[dev]"
	touch $(STAMP)

# the main job: MobileNetV2 on the real data set in data/concrete_crack/ (see README)
train: setup
	$(PY) train.py model=mobilenetv2 trainer.max_epochs=10 $(ARGS)

# offline demo on synthetic images, no download
demo: setup
	$(PY) train.py experiment=demo $(ARGS)

test: setup
	$(PY) -m pytest $(ARGS)

lint: setup
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .

format: setup
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean:
	rm -rf .cache .pytest_cache .ruff_cache logs
