# ichpro: the two commands are `make reproduce` and `make test`.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
PROFILE ?= cpu
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

# executed cpu notebooks are committed (to read without running); other profiles stay in runs/
ifeq ($(PROFILE),cpu)
OUTPUTS := --figures-dir figures --notebooks-dir figures/notebooks --readme README.md
else
OUTPUTS := --figures-dir runs/$(PROFILE)/figures
endif

.PHONY: setup notebook-filter reproduce test lint bench clean

setup: $(STAMP) notebook-filter

# Source notebooks reach git without outputs, execution counts or the kernel's version
# (ichpro.reproduce.VOLATILE_METADATA): JupyterLab saves them so (a pre-save hook), and a git filter
# from nbstripout strips whatever another editor saved (.gitattributes applies it to notebooks/ only).
JUPYTER_HOOK := $(VENV)/etc/jupyter/jupyter_server_config.json

notebook-filter: $(STAMP)
	@mkdir -p $(dir $(JUPYTER_HOOK))
	@echo '{"FileContentsManager": {"pre_save_hook": "ichpro.reproduce.strip_source_notebook"}}' > $(JUPYTER_HOOK)
	@if git rev-parse --is-inside-work-tree >/dev/null 2>&1; then \
	  git config filter.nbstripout.clean "'$(CURDIR)/$(BIN)/python' -m nbstripout --keep-id"; \
	  git config filter.nbstripout.smudge cat; \
	  git config filter.nbstripout.required true; \
	  git config filter.nbstripout.extrakeys "metadata.language_info"; \
	  git config diff.ipynb.textconv "'$(CURDIR)/$(BIN)/python' -m nbstripout -t --keep-id"; \
	fi

# torch is pinned first so that pip takes the CPU build instead of a multi-GB CUDA build.
$(STAMP): pyproject.toml
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	$(BIN)/python -m ipykernel install --prefix $(VENV) --name python3 >/dev/null
	touch $(STAMP)

reproduce: setup
	$(BIN)/ichpro reproduce --profile $(PROFILE) $(OUTPUTS)

test: setup
	$(BIN)/python -m pytest

bench: $(STAMP)
	$(BIN)/python bench/run_all.py

lint: $(STAMP)
	$(BIN)/ruff check ichpro tests bench

clean:
	rm -rf runs cache .pytest_cache
