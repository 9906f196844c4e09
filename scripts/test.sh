#!/usr/bin/env bash
# Set up a virtual environment with every extra and run the whole test suite.
# This is the README's test command and what CI runs (.ci/run) on a clean clone.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
# Debian's aarch64 cross compiler (tests/test_fused.py builds the fused kernel's source for
# ARM), installed while pip works.
cross_compiler=
if ! command -v aarch64-linux-gnu-g++ >/dev/null; then
    { apt-get update -qq && apt-get install -y -qq g++-aarch64-linux-gnu >/dev/null; } &
    cross_compiler=$!
fi
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
# tensorflow-cpu stands in for the [tensorflow] extra's full tensorflow build on this CPU-only
# machine; jax gives Keras its third backend, so tests_keras runs the optimizers on all three.
# --no-compile: modules are byte-compiled when first imported, not all of every package here.
.venv/bin/python -m pip install --quiet --no-compile tensorflow-cpu jax -e ".[keras,transformers,timm,demo,mujoco,test,docs,distributed,optax,frameworks]"
[ -z "$cross_compiler" ] || wait "$cross_compiler"
echo "set-up: ${SECONDS} s"

.venv/bin/python -m ruff check .
.venv/bin/python -m ruff format --check .
# The documentation site builds with no warning: every nav page exists, links resolve, and the
# API pages' docstrings parse. Its ```python examples run in tests/test_docs_examples.py.
site_dir=$(mktemp -d)
TF_CPP_MIN_LOG_LEVEL=2 NO_MKDOCS_2_WARNING=1 .venv/bin/python -m mkdocs build --strict --quiet --site-dir "$site_dir"
rm -rf "$site_dir"
# PyTorch-side tests (torch, transformers, timm, distributed) and the TensorFlow/Keras tests run
# in separate processes: importing triton after tensorflow in one process crashes.
# -m "slow or not slow": every test (a bare `pytest` leaves the slow ones out). -n: one worker
# per core, each test file on one worker (module fixtures run once); the longest files are
# named first so that no worker starts one of them last.
LONGEST="tests/test_distributed.py tests/test_demo.py tests/test_sac.py tests/test_docs_examples.py
         tests/test_cli.py tests/test_lightning.py tests/test_plugins.py tests/test_transformers.py"
# shellcheck disable=SC2086
.venv/bin/python -m pytest $LONGEST tests -q -m "slow or not slow" -n auto --maxprocesses 4 --dist loadfile
echo "ruff, docs and the PyTorch-side tests: ${SECONDS} s"
.venv/bin/python -m pytest tests_keras -q -m "slow or not slow" -n auto --maxprocesses 4
echo "all tests: ${SECONDS} s"
