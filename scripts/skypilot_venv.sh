#!/usr/bin/env bash
# A throwaway virtual environment with SkyPilot, for tests/test_skypilot.py to load rendered task files with
# SkyPilot's own parser. Not the project's environment: SkyPilot pulls in ~50 packages (459 MB).
#
#   scripts/skypilot_venv.sh [DIR]      (default /tmp/skyvenv; SKYPILOT_VERSION, default 0.14.1)
# Idempotent: an environment that already imports sky is kept. Prints the interpreter's path.
set -euo pipefail
DIR=${1:-/tmp/skyvenv}
VERSION=${SKYPILOT_VERSION:-0.14.1}
PY=${PYTHON:-python3}
if [[ -x $DIR/bin/python ]] && "$DIR/bin/python" -c "import sky" 2>/dev/null; then
    echo "$DIR/bin/python"
    exit 0
fi
"$PY" -m venv "$DIR"
"$DIR/bin/python" -m pip install -q --disable-pip-version-check "skypilot==$VERSION" >&2
"$DIR/bin/python" -c "import sky" >&2
echo "$DIR/bin/python"
