# Sourced by the scripts in this folder: creates .venv and installs kubetune into it.
# KUBETUNE_EXTRAS selects the extras (default: all that the test suite needs).
set -euo pipefail

KUBETUNE_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${KUBETUNE_VENV:-$KUBETUNE_ROOT/.venv}"

kubetune_python() {
    local candidate
    for candidate in python3.11 python3; do
        if command -v "$candidate" >/dev/null && "$candidate" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
            echo "$candidate"
            return
        fi
    done
    echo "kubetune needs Python 3.11 (python3.11 or python3 on PATH)" >&2
    return 1
}

# pip's strict editable install warns at length about its build folder: keep errors, drop that.
_kubetune_quiet_pip() {
    "$@" 2> >(grep -v -e 'Editable installation' -e '^\s*$' -e '\*\*\*' -e '!!' -e 'auxiliary directory' \
        -e 'build/__editable__' -e 'careful to not remove' -e 'wheel_obj' -e 'import/use' >&2)
}

kubetune_setup() {
    local extras="${KUBETUNE_EXTRAS:-dev,runtime,runtime-test}" stamp
    if [ ! -x "$VENV/bin/python" ]; then
        echo "creating $VENV" >&2
        "$(kubetune_python)" -m venv "$VENV"
        "$VENV/bin/pip" install --quiet --progress-bar off --upgrade pip "setuptools>=75"
    fi
    # Dependencies: reinstalled only when pyproject.toml or the extras change.
    stamp="$VENV/.kubetune-deps-$(cat "$KUBETUNE_ROOT/pyproject.toml" <(echo "$extras") | sha256sum | cut -c1-16)"
    if [ ! -e "$stamp" ]; then
        echo "installing kubetune[$extras] dependencies" >&2
        _kubetune_quiet_pip "$VENV/bin/pip" install --quiet --progress-bar off -e "$KUBETUNE_ROOT[$extras]" \
            --config-settings editable_mode=strict
        rm -f "$VENV"/.kubetune-deps-*
        touch "$stamp"
    fi
    # The strict editable install links each module file; relink so new modules are importable.
    _kubetune_quiet_pip "$VENV/bin/pip" install --quiet --progress-bar off --no-deps --no-build-isolation \
        -e "$KUBETUNE_ROOT" --config-settings editable_mode=strict
}
