#!/usr/bin/env bash
# Sets up everything prunekit needs on a fresh Debian machine (run as root):
# Fashion-MNIST from Debian's package, a virtual environment in .venv, the package itself.
set -euo pipefail
cd "$(dirname "$0")"
if ! dpkg -s dataset-fashion-mnist >/dev/null 2>&1; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null
fi
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
if ! .venv/bin/pip install -q --disable-pip-version-check -c constraints.txt -e '.[dev]' \
  >.venv/pip-install.log 2>&1; then
  cat .venv/pip-install.log
  exit 1
fi
.venv/bin/python -c "import prunekit, torch; print('prunekit ready, torch', torch.__version__)"
