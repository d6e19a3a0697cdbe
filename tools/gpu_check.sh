#!/usr/bin/env bash
# The one-command GPU check (README, GPU check): bf16 logit parity with transformers on the 7B
# shapes, then a packed Megatron train step on the 3B and 7B shapes (8 layers), as JSON lines;
# exit status 0 when parity passed and every step finished. The check is megavrl.checks.gpu.
#
# Usage:
#   tools/gpu_check.sh --download-wheels DIR [--python-version 3.12]   (a machine with PyPI access)
#   tools/gpu_check.sh [--wheels DIR] [megavrl.checks.gpu options]      (the GPU machine)
#   tools/gpu_check.sh --dry-run                                        (any machine, CPU only)
#
# The GPU machine needs CUDA, PyTorch and transformers, not network: the wheels of what megavrl
# imports beyond those (tools/gpu_check_wheels.txt) travel in DIR, and --wheels installs the ones
# whose package is missing into a temporary folder put on PYTHONPATH (nothing else is changed).
# megavrl itself runs from this checkout. vLLM and Transformer Engine are not needed; Transformer
# Engine's layers are used when it imports.
#
# Environment: PYTHON [python3]   the interpreter that has torch and transformers
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-python3}
wheel_list="$repo/tools/gpu_check_wheels.txt"
wheel_limit_mib=64  # what travels with one call to the GPU machine

usage() { sed -n '2,17p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }

download_wheels() {
  # The listed wheels for the GPU machine's CPython on x86-64 Linux, without their dependencies
  # (numpy, packaging and torch are there already). megatron-core's wheel is per Python version.
  local dir=$1 python_version=$2 total
  mkdir -p "$dir"
  grep -v '^\s*\(#\|$\)' "$wheel_list" | xargs "$PYTHON" -m pip download --no-deps --only-binary=:all: \
    --dest "$dir" --python-version "$python_version" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform any
  total=$(du -cb "$dir"/*.whl | tail -n 1 | cut -f 1)
  ls -l "$dir"/*.whl
  echo "gpu_check: $(( (total + 1048575) / 1048576 )) MiB of wheels in $dir (limit $wheel_limit_mib MiB)"
  if (( total > wheel_limit_mib * 1048576 )); then
    echo "gpu_check: the wheels exceed $wheel_limit_mib MiB: they would not travel with one call" >&2
    return 1
  fi
}

install_missing_wheels() {
  # Install each wheel of $1 whose distribution $PYTHON lacks into $2, no index, no dependencies.
  local dir=$1 target=$2 wheel name missing=()
  shopt -s nullglob
  local found=("$dir"/*.whl)
  if (( ${#found[@]} == 0 )); then
    echo "gpu_check: no wheels in $dir: fill it with tools/gpu_check.sh --download-wheels $dir" >&2
    return 1
  fi
  for wheel in "${found[@]}"; do
    name=$(basename "$wheel"); name=${name%%-*}
    if "$PYTHON" -c 'import importlib.metadata as m, sys; m.version(sys.argv[1])' "$name" 2>/dev/null; then
      echo "gpu_check: $name is installed already: $(basename "$wheel") not used"
    else
      missing+=("$wheel")
    fi
  done
  if (( ${#missing[@]} )); then
    "$PYTHON" -m pip install --quiet --no-index --no-deps --target "$target" "${missing[@]}"
    echo "gpu_check: installed ${#missing[@]} wheel(s) into $target"
  fi
}

download="" python_version=3.12 wheels="" check_args=() dry_run=0
while (( $# )); do
  case $1 in
    --download-wheels) download=${2:?--download-wheels needs a folder}; shift 2 ;;
    --python-version) python_version=${2:?--python-version needs X.Y}; shift 2 ;;
    --wheels) wheels=${2:?--wheels needs a folder}; shift 2 ;;
    --dry-run) dry_run=1; check_args+=("$1"); shift ;;
    -h|--help) usage; exit 0 ;;
    *) check_args+=("$1"); shift ;;
  esac
done

if [[ -n "$download" ]]; then
  download_wheels "$download" "$python_version"
  exit
fi

site=$(mktemp -d "${TMPDIR:-/tmp}/megavrl-gpu-check-site.XXXXXX")
trap 'rm -rf "$site"' EXIT
if [[ -n "$wheels" ]]; then
  install_missing_wheels "$wheels" "$site"
fi
if (( dry_run )); then
  export CUDA_VISIBLE_DEVICES=""  # the CPU path, also on a machine with GPUs
fi
export PYTHONPATH="$repo:$site${PYTHONPATH:+:$PYTHONPATH}"
cd "$repo"
"$PYTHON" -m megavrl.checks.gpu "${check_args[@]}"
