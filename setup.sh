#!/usr/bin/env bash
# Sets up everything prunekit needs on a fresh Debian machine (run as root):
# Fashion-MNIST from Debian's package, a virtual environment in .venv, the package itself
# with its dev, transformers and cluster extras (the tests use all three), versions from constraints.txt.
set -euo pipefail
cd "$(dirname "$0")"
say() { printf 'setup: %s\n' "$*"; }
if dpkg -s dataset-fashion-mnist >/dev/null 2>&1; then
  say "Fashion-MNIST: Debian package dataset-fashion-mnist already installed"
else
  say "Fashion-MNIST: installing Debian package dataset-fashion-mnist (apt-get update + install)..."
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null
fi
if [ -x .venv/bin/python ]; then
  say "virtual environment: .venv exists"
else
  say "virtual environment: creating .venv"
  python3 -m venv .venv
fi
say "packages: installing prunekit[dev,transformers,cluster] with torch, lightning, transformers, submitit" \
  "pinned by constraints.txt (a few minutes on a fresh machine; log: .venv/pip-install.log)..."
if ! .venv/bin/pip install -q --disable-pip-version-check -c constraints.txt -e '.[dev,transformers,cluster]' \
  >.venv/pip-install.log 2>&1; then
  cat .venv/pip-install.log
  exit 1
fi
say "checking the installation..."
.venv/bin/python -c "import prunekit, submitit, torch, transformers; print('setup: prunekit ready, torch', torch.__version__, '- transformers', transformers.__version__)"
