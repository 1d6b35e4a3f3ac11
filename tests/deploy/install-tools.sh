#!/usr/bin/env bash
# Installs what tests/deploy needs: the chart rendering and schema libraries into the project's virtualenv, and
# checkov into its own virtualenv at .venv-checkov (its pins conflict with the project's test tools).
# Idempotent: a second run only checks. Usage, from anywhere: bash tests/deploy/install-tools.sh
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
python="${PYTHON:-$repo/.venv/bin/python}"
checkov_venv="${CHECKOV_VENV:-$repo/.venv-checkov}"
checkov_version="$(sed -n 's/^checkov==//p' "$here/checkov-requirements.txt")"

"$python" -m pip install --quiet --disable-pip-version-check -r "$here/requirements.txt"

if [ "$("$checkov_venv/bin/checkov" --version 2>/dev/null || true)" != "$checkov_version" ]; then
  rm -rf "$checkov_venv"
  "$python" -m venv "$checkov_venv"
  "$checkov_venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-cache-dir \
    -r "$here/checkov-requirements.txt"
fi
echo "checkov $("$checkov_venv/bin/checkov" --version) in $checkov_venv"
