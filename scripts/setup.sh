#!/usr/bin/env bash
# Set up everything this project needs on a fresh Debian machine: Debian packages (when apt is
# usable) and a virtual environment in .venv with the project and its tools.
# Safe to run again: it reinstalls only when pyproject.toml has changed.
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian packages: the dataset, and a C++ compiler for torch.compile's CPU kernels (--compile, the
# `compiled` deploy mode).
packages=()
[ -d /usr/share/datasets/fashion-mnist ] || packages+=(dataset-fashion-mnist)
command -v g++ >/dev/null || packages+=(g++)
if [ ${#packages[@]} -gt 0 ] && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${packages[@]}" >/dev/null) \
    || echo "setup: could not install ${packages[*]}; Fashion-MNIST will need --data-dir, torch.compile a C++ compiler" >&2
fi

stamp=.venv/.parnet-installed
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  [ -x .venv/bin/python ] || python3 -m venv .venv
  .venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip
  .venv/bin/python -m pip install -q --disable-pip-version-check -e ".[dev]"
  echo "$want" > "$stamp"
fi
