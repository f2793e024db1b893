#!/usr/bin/env bash
# Set up .venv for pyro-bc: find a Python >= 3.12, create .venv if missing, install the project (editable, with the
# dev extra) and skip the install when pyproject.toml has not changed since the last successful one.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=.venv
STAMP="$VENV/.stamp"

ok_python() {  # ok_python CMD: true when CMD runs and is Python >= 3.12
    "$1" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 12) else 1)' >/dev/null 2>&1
}

find_python() {
    local c v root
    for c in python3.12 python3.13 python3; do
        if command -v "$c" >/dev/null 2>&1 && ok_python "$c"; then
            command -v "$c"; return 0
        fi
    done
    if command -v pyenv >/dev/null 2>&1; then
        root="$(pyenv root 2>/dev/null || echo "$HOME/.pyenv")"
        for v in $(pyenv versions --bare 2>/dev/null | grep -E '^3\.(1[2-9]|[2-9][0-9])(\.|$)' | sort -V); do
            for c in "$root/versions/$v/bin/python3" "$root/versions/$v/bin/python"; do
                if [ -x "$c" ] && ok_python "$c"; then echo "$c"; return 0; fi
            done
        done
    fi
    for c in "$HOME"/.pyenv/versions/3.12*/bin/python3.12 "$HOME"/.pyenv/versions/3.13*/bin/python3.13; do
        if [ -x "$c" ] && ok_python "$c"; then echo "$c"; return 0; fi
    done
    return 1
}

if [ ! -x "$VENV/bin/python" ] || ! ok_python "$VENV/bin/python"; then
    if ! PY="$(find_python)"; then
        echo "setup: error: no Python >= 3.12 found (tried python3.13, python3.12, python3 on PATH and pyenv)" >&2
        exit 1
    fi
    echo "setup: creating $VENV with $PY ($("$PY" --version 2>&1))"
    rm -rf "$VENV"
    "$PY" -m venv "$VENV"
fi

want="$(sha256sum pyproject.toml | cut -d' ' -f1)"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then
    exit 0
fi

echo "setup: installing pyro-bc into $VENV (first run takes a minute or two)"
"$VENV/bin/python" -m pip install -q torch==2.13.0
"$VENV/bin/python" -m pip install -q -e '.[dev]'
echo "$want" > "$STAMP"
echo "setup: done"
