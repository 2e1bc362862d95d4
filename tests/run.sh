#!/usr/bin/env bash
# The test command (README): unit tests and doctests, notebooks re-executed at smoke scale, the book with warnings as errors.
set -euo pipefail
cd "$(dirname "$0")/.."
export AUXNB_SCALE=smoke AUXNB_DEVICE=${AUXNB_DEVICE:-cpu} MPLBACKEND=Agg OMP_NUM_THREADS=1
export JUPYTER_CONFIG_DIR="$PWD/.jupyter" JUPYTER_PLATFORM_DIRS=1 PYDEVD_DISABLE_FILE_VALIDATION=1
python -m pytest -q -n 2 --dist loadgroup tests auxnb --doctest-modules --ignore=tests/test_browser.py
python -m pytest -q -n 2 --dist loadfile --nbval-lax --nbval-sanitize-with tests/nbval_sanitize.cfg -p no:cacheprovider notebooks
rm -rf book/_build
jupyter-book build book -W -n --keep-going
# The built pages in headless Chromium, offline (maths typeset, images loaded, the widget works).
start=$(date +%s)
python -m pytest -q -p no:cacheprovider -rs tests/test_browser.py
echo "browser test: $(( $(date +%s) - start )) s"
