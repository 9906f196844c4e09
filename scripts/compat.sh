#!/usr/bin/env bash
# The version matrix: one virtual environment per row, each with the versions it names, running
# the tests that concern that row. Not part of the README's test command: it downloads several
# gigabytes (a torch per row). The environments are kept under $COMPAT_DIR between runs.
#
#   bash scripts/compat.sh                 # every row
#   bash scripts/compat.sh torch-2.15      # the rows whose name starts with an argument
#
# Prints one line per row (PASS/FAIL, versions, time, test counts) and appends it to
# $COMPAT_DIR/results.tsv.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
COMPAT_DIR=${COMPAT_DIR:-/tmp/ano-compat}
mkdir -p "$COMPAT_DIR"

# The fused step's operator and kernel, against the reference and the other paths. Groups
# separated by ";" run in separate pytest processes: torch 2.4's Inductor builds its CPU code with
# -ffast-math, which turns on flush-to-zero for the whole process once a compiled step has run,
# and the 8-bit tests check subnormal codes.
FUSED_TESTS="tests/test_fused.py;tests/test_blockwise8.py tests/test_reference_parity.py tests/test_execution_paths.py"

# name | Python version | pip requirements (PIP_CONSTRAINT lifted where a row needs a newer torch than
# this machine's pip configuration allows) | tests
ROWS=(
    "torch-2.4.1|3.11|torch==2.4.1 numpy<2|$FUSED_TESTS"
    "torch-2.15.0|3.11|torch==2.15.0 numpy|$FUSED_TESTS"
    "python-3.10|3.10|torch==2.14.1 numpy|$FUSED_TESTS tests/test_optimizer_api.py"
    "python-3.13|3.13|torch==2.14.1 numpy|$FUSED_TESTS tests/test_optimizer_api.py"
    # The oldest Hugging Face stack supported, on the torch of its time (USE_TF=0 keeps
    # transformers 4.x from importing TensorFlow), and the last 4.x release.
    "transformers-4.40.2|3.11|torch==2.4.1 numpy<2 transformers==4.40.2 accelerate==0.26.1|tests/test_transformers.py tests/test_optimizer_api.py"
    "transformers-4.57.6|3.11|torch==2.14.1 numpy transformers==4.57.6 accelerate|tests/test_transformers.py"
    "timm-1.0.12|3.11|torch==2.14.1 torchvision numpy timm==1.0.12|tests/test_timm.py"
    # The oldest Keras supported (3.10: Optimizer.add_optimizer_variables) on the oldest
    # TensorFlow, with JAX and torch for Keras's other backends (tests_keras runs each backend in
    # its own process).
    "keras-3.10.0|3.11|tensorflow-cpu==2.16.2 keras==3.10.0 jax[cpu]==0.4.30 torch==2.14.1 numpy<2 pyyaml|tests_keras"
)

# The interpreter of a Python version: pyenv's newest install of it, else pythonX.Y on PATH.
interpreter() {
    local version
    if command -v pyenv >/dev/null; then
        version=$(pyenv versions --bare | grep -E "^$1(\.|$)" | sort -V | tail -1)
        [ -n "$version" ] && { echo "$(pyenv root)/versions/$version/bin/python$1"; return; }
    fi
    command -v "python$1"
}

# One line naming the row's versions of everything installed that the tests concern.
VERSIONS='
import importlib.metadata as m, sys
names = ["torch", "transformers", "accelerate", "timm", "keras", "tensorflow-cpu", "jax"]
found = [f"{n} {m.version(n)}" for n in names if any(d.name == n for d in m.distributions())]
print("python", sys.version.split()[0], ", ".join(found))
'

results="$COMPAT_DIR/results.tsv"
touch "$results"  # appended to: one line per row and run
failed=0
for row in "${ROWS[@]}"; do
    IFS="|" read -r name python requirements tests <<<"$row"
    if [ $# -gt 0 ]; then
        wanted=0
        for prefix in "$@"; do [[ $name == "$prefix"* ]] && wanted=1; done
        [ $wanted = 1 ] || continue
    fi
    venv="$COMPAT_DIR/$name"
    log="$COMPAT_DIR/$name.log"
    start=$(date +%s)
    echo "== $name: setting up $venv (log: $log)"
    (
        [ -x "$venv/bin/python" ] || "$(interpreter "$python")" -m venv "$venv" || exit 1
        # shellcheck disable=SC2086
        PIP_CONSTRAINT=/dev/null "$venv/bin/python" -m pip install --quiet $requirements \
            pytest expecttest ninja &&
            PIP_CONSTRAINT=/dev/null "$venv/bin/python" -m pip install --quiet --no-deps -e "$ROOT" &&
            "$venv/bin/python" -c "$VERSIONS" || exit 1
        IFS=";" read -ra groups <<<"$tests"
        for group in "${groups[@]}"; do
            # shellcheck disable=SC2086
            USE_TF=0 TORCH_EXTENSIONS_DIR="$venv/torch_extensions" "$venv/bin/python" -m pytest -q -p no:cacheprovider -m "slow or not slow" $group || exit 1
        done
    ) >"$log" 2>&1
    status=$?
    seconds=$(($(date +%s) - start))
    versions=$(grep -m1 "^python " "$log" || echo "setup failed")
    summary=$(grep -E "[0-9]+ (passed|failed)" "$log" | sed 's/=//g' | paste -sd ";" -)
    if [ $status = 0 ]; then verdict=PASS; else verdict=FAIL; failed=1; fi
    printf "%s\t%s\t%s\t%s\t%ss\t%s\n" "$(date +%F)" "$name" "$verdict" "$versions" "$seconds" "$summary" | tee -a "$results"
done
exit $failed
