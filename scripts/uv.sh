#!/usr/bin/env bash
# Sourced by scripts/env.sh and scripts/compat.sh: the pinned uv installer and the download cache
# that every clone on the machine shares. Only the cache is shared: each clone builds its own
# virtual environment (hard links into the cache, so a second clone sets up in seconds).
UV_VERSION=0.13.9
cache="${VLLM_PRUMERGE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/vllm-prumerge}"
python="${PYTHON:-python3}"
export UV_CACHE_DIR="${UV_CACHE_DIR:-$cache/uv-cache}"
# uv reads neither pip's config nor PIP_FIND_LINKS, so this machine's local torch+cpu wheel folder
# stays out of view (its 2.13.0+cpu sorts above PyPI's 2.13.0 and breaks the torchvision pairing).
export UV_NO_PROGRESS=1
mkdir -p "$cache"

# The uv binary, installed once per machine into the cache with the machine's own pip.
uv_bin() {
  local tools="$cache/uv-$UV_VERSION"
  if [ ! -x "$tools/bin/uv" ]; then
    printf '[env] installing uv %s into %s\n' "$UV_VERSION" "$tools" >&2
    rm -rf "$tools"
    "$python" -m venv "$tools" >&2
    env -u PIP_FIND_LINKS PIP_CONFIG_FILE=/dev/null \
      "$tools/bin/python" -m pip install -q --disable-pip-version-check "uv==$UV_VERSION" >&2
  fi
  echo "$tools/bin/uv"
}
