# make demo: a fresh machine to a trained, evaluated Fashion-MNIST model.  make test: the test suite.
# Both install into .venv first; torch/torchvision come from the pins in pyproject.toml, every other
# version from constraints.txt, so a resolver never pulls another torch.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_ARGS ?= train.max_minutes=10

.PHONY: install demo test test-fast clean fashion-mnist-data browser

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e ".[test,pretrained,tracking,tune,export,serve,doctor]"
	touch $(STAMP)

install: $(STAMP)

# Fashion-MNIST comes from Debian's dataset-fashion-mnist package (no download at run time).
fashion-mnist-data:
	@if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    (apt-get install -y -qq dataset-fashion-mnist || (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist)) >/dev/null; \
	  else echo "Fashion-MNIST missing: run 'sudo apt-get install dataset-fashion-mnist' (or imgcls downloads it when online)"; fi; \
	fi

# The report test opens report.html in headless Chromium (Debian's chromium + chromium-driver).
browser:
	@if ! command -v chromedriver >/dev/null || ! command -v chromium >/dev/null; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    (apt-get install -y -qq chromium chromium-driver || (apt-get update -qq && apt-get install -y -qq chromium chromium-driver)) >/dev/null; \
	  else echo "Chromium missing: run 'sudo apt-get install chromium chromium-driver' (the report test needs it)"; fi; \
	fi

demo: install fashion-mnist-data
	$(BIN)/imgcls train fashion-mnist run.name=demo-$$(date +%Y%m%d-%H%M%S) $(DEMO_ARGS)
	$(BIN)/imgcls report $$(ls -td runs/demo-*/ | head -1)

test: install browser
	$(BIN)/python -m pytest

test-fast: install browser
	$(BIN)/python -m pytest -m "not slow"

clean:
	rm -rf $(VENV) runs .pytest_cache
