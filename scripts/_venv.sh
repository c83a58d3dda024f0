# shellcheck shell=bash
# Shared by scripts/test and scripts/run (sourced, not executed).
#
#   ensure_venv [EXTRA]
#
# Run from the repository root. Creates .venv with Python >= 3.11 when it is
# missing or broken, then runs `pip install -e '.[EXTRA]'` (or `-e .`) only
# when the project is not installed yet or setup.cfg / pyproject.toml, the
# Python version or the repo path changed since the last install. The state
# of the last install is kept in .venv/.switchboard-install (a hash and the
# extra that was installed). Quiet when nothing needs doing; says what it
# installs otherwise. SWITCHBOARD_PYTHON picks the interpreter.

_venv_say() { printf '==> %s\n' "$*" >&2; }

_venv_pick_python() {
    local candidate
    for candidate in "${SWITCHBOARD_PYTHON:-}" python3.11 python3 python; do
        [ -n "$candidate" ] || continue
        command -v "$candidate" >/dev/null 2>&1 || continue
        if "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
            command -v "$candidate"
            return 0
        fi
    done
    return 1
}

_venv_create() {
    local python
    if ! python="$(_venv_pick_python)"; then
        _venv_say "error: Python >= 3.11 not found (set SWITCHBOARD_PYTHON)"
        return 1
    fi
    _venv_say "Creating .venv with $python ($("$python" -V 2>&1))"
    rm -rf .venv/bin .venv/lib .venv/lib64 .venv/include .venv/pyvenv.cfg
    if ! "$python" -m venv .venv >/dev/null 2>&1; then
        # Debian's own python3 needs python3-venv (ensurepip) for this.
        if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
            local pkg
            pkg="python3-venv"
            "$python" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' &&
                pkg="python3.11-venv"
            _venv_say "Installing $pkg (apt-get)"
            DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
                --no-install-recommends "$pkg" >/dev/null 2>&1 || true
        fi
        "$python" -m venv .venv || {
            _venv_say "error: could not create .venv"
            return 1
        }
    fi
}

_venv_hash() {
    # Everything that should trigger a reinstall when it changes.
    {
        printf 'repo=%s\n' "$PWD"
        .venv/bin/python -c 'import sys; print(sys.version)'
        local f
        for f in setup.cfg pyproject.toml; do
            if [ -f "$f" ]; then
                printf '%s\n' "$f"
                cat "$f"
            fi
        done
    } | sha256sum | cut -d' ' -f1
}

ensure_venv() {
    local extra="${1:-}" spec="." stamp=".venv/.switchboard-install"
    [ -n "$extra" ] && spec=".[$extra]"

    mkdir -p .venv
    # Two scripts starting at once must not build the venv together.
    if command -v flock >/dev/null 2>&1; then
        exec 9>.venv/.lock
        flock 9
    fi

    if ! .venv/bin/python -c '' >/dev/null 2>&1; then
        _venv_create || return 1
        rm -f "$stamp"
    fi

    local want have_hash="" have_extras=""
    want="$(_venv_hash)"
    if [ -f "$stamp" ]; then
        read -r have_hash have_extras <"$stamp" || true
    fi
    local current=0
    if [ "$have_hash" = "$want" ] &&
        { [ -z "$extra" ] || [[ ",$have_extras," == *",$extra,"* ]]; } &&
        .venv/bin/python -c 'import importlib.metadata as m; m.distribution("switchboard")' \
            >/dev/null 2>&1; then
        current=1
    fi

    if [ "$current" = 0 ]; then
        _venv_say "Installing switchboard ($spec, editable) into .venv"
        local log
        log="$(mktemp -t switchboard-pip.XXXXXX)"
        if ! PIP_DISABLE_PIP_VERSION_CHECK=1 .venv/bin/python -m pip install -q -e "$spec" \
            >"$log" 2>&1; then
            # Leave out pip's notes about unusable local index locations.
            grep -v "^WARNING: Location '.*' is ignored" "$log" >&2 || true
            rm -f "$log"
            _venv_say "error: pip install -e '$spec' failed"
            return 1
        fi
        rm -f "$log"
        printf '%s %s\n' "$want" "$extra" >"$stamp"
    fi

    if command -v flock >/dev/null 2>&1; then
        exec 9>&-
    fi
    return 0
}
