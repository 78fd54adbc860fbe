#!/usr/bin/env bash
# Bootstrap layerfs on Debian/Ubuntu: system packages (only when missing), a
# virtualenv in .venv, and the package itself (editable, with its C extension).
# Sourced by scripts/layerfs and scripts/test; safe to run again.
set -euo pipefail
LAYERFS_HOME="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${LAYERFS_VENV:-$LAYERFS_HOME/.venv}"

_layerfs_apt_packages=(fuse3 libfuse3-dev pkg-config gcc python3-dev python3-venv zlib1g-dev libisal-dev attr
                       tar gzip ca-certificates)
if [ "${1:-}" = "--test" ]; then
  _layerfs_apt_packages+=(docker-registry skopeo umoci fuse-overlayfs pigz zstd xz-utils make git)
  # the additional layer store's engine tests (tests/fuse/test_engine_store.py): podman 4.3 with runc
  _layerfs_apt_packages+=(podman runc containers-storage)
fi

_layerfs_missing=()
for p in "${_layerfs_apt_packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || _layerfs_missing+=("$p")
done
if [ "${#_layerfs_missing[@]}" -gt 0 ]; then
  if command -v apt-get >/dev/null 2>&1; then
    SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    echo "layerfs: installing system packages: ${_layerfs_missing[*]}" >&2
    $SUDO apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${_layerfs_missing[@]}" >&2
  else
    echo "layerfs: missing system packages (${_layerfs_missing[*]}) and no apt-get to install them" >&2
    exit 1
  fi
fi

PY="${PYTHON:-python3}"
stamp="$VENV/.layerfs-installed"
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV" >&2
fi
# reinstall when the project's build inputs changed since the last install
if [ ! -f "$stamp" ] || [ -n "$(find "$LAYERFS_HOME/pyproject.toml" "$LAYERFS_HOME/setup.py" "$LAYERFS_HOME/native" -newer "$stamp" 2>/dev/null | head -1)" ]; then
  "$VENV/bin/python" -m pip install -q --upgrade pip >&2
  "$VENV/bin/python" -m pip install -q -e "$LAYERFS_HOME[test]" >&2
  touch "$stamp"
fi
