#!/usr/bin/env bash
# Sets up .venv with the project and its test extra, once: skipped while .venv holds an
# install made from this setup.py (a changed setup.py installs again). The README's two
# commands and .ci/run start with it.
set -euo pipefail
cd "$(dirname "$0")"
stamp=".venv/.installed-$(sha256sum setup.py | cut -c1-16)"
if [ -f "$stamp" ]; then
  exit 0
fi
python3 -m venv .venv
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q -e '.[test]'
rm -f .venv/.installed-*
touch "$stamp"
