# The two commands of the README:  make demo  (the main job)  and  make test  (the test suite).
VENV ?= .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?=

.PHONY: demo test setup dev lock bench clean

setup:
	bash scripts/bootstrap.sh

demo: setup
	$(BIN)/megamom train

test:
	bash scripts/bootstrap.sh dev
	MEGAMOM_EXPECT_INSTALLED=1 $(BIN)/pytest $(PYTEST_ARGS)

# Editable install for development (tests then run against the source tree).
dev:
	bash scripts/bootstrap.sh dev
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .

# Refresh requirements/constraints.txt (the tested versions every install takes): newest allowed
# releases in a throw-away venv, the full test suite, then the frozen versions.
lock:
	bash scripts/lock.sh

clean:
	rm -rf build dist *.egg-info .pytest_cache
