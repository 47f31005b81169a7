#!/usr/bin/env bash
# Create .venv-vbench: VBench 0.1.5 in a virtual environment of its own.
#
#   bash scripts/vbench_env.sh
#
# Why separate: VBench's setup refuses CUDA builds of torch outside 11.6-12.1 and its
# requirements pin transformers==4.33.2 (and older numpy/timm); installed into .venv they would
# replace this repository's torch. src/eval/vbench.py drives this environment through its
# `vbench` command line and never imports the package.
#
# Order matters (VBench's documented friction):
#   1. a CUDA build of torch/torchvision first (every later build compiles against it);
#   2. detectron2 from source, before vbench (Vchitect/VBench#73): the GRiT detector behind
#      object class, multiple objects, color and spatial relationship needs it;
#   3. vbench==0.1.5, which brings its own pins (transformers==4.33.2 among them).
# Needs network access (PyPI, the PyTorch wheel index, GitHub), a C++ compiler for detectron2,
# and `wget` on PATH at evaluation time: VBench downloads its pretrained models into
# ~/.cache/vbench the first time each dimension runs. Evaluating needs a CUDA GPU; installing
# does not.
#
# Idempotent: each step checks whether it is already done, says what it did or kept, and the
# script can be re-run after a failure. Settings (environment variables):
#   VBENCH_VENV              target folder (default: <repo>/.venv-vbench)
#   PY                       interpreter for the venv (default: python3; 3.8-3.11, the range
#                            torch 2.1 ships wheels for)
#   VBENCH_TORCH             torch pins (default: "torch==2.1.2 torchvision==0.16.2")
#   VBENCH_TORCH_INDEX       wheel index (default: https://download.pytorch.org/whl/cu121)
#   VBENCH_DETECTRON2        detectron2 source (default: git+https://github.com/facebookresearch/detectron2.git)
#   VBENCH_SKIP_DETECTRON2=1 skip detectron2 (the four GRiT dimensions will then fail)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VBENCH_VENV:-$ROOT/.venv-vbench}"
PY="${PY:-python3}"
VBENCH_VERSION="0.1.5"
TORCH_SPEC="${VBENCH_TORCH:-torch==2.1.2 torchvision==0.16.2}"
TORCH_INDEX="${VBENCH_TORCH_INDEX:-https://download.pytorch.org/whl/cu121}"
DETECTRON2_SRC="${VBENCH_DETECTRON2:-git+https://github.com/facebookresearch/detectron2.git}"

say() { printf '[vbench-env] %s\n' "$*"; }
die() { printf '[vbench-env] ERROR: %s\n' "$*" >&2; exit 1; }

# 1. the virtual environment ------------------------------------------------------------------
if [[ -x "$VENV/bin/python" ]]; then
  say "venv exists, kept: $VENV ($("$VENV/bin/python" --version 2>&1))"
else
  command -v "$PY" >/dev/null || die "interpreter '$PY' not found; set PY=/path/to/python3.11"
  "$PY" -c 'import sys; sys.exit(0 if (3, 8) <= sys.version_info[:2] <= (3, 11) else 1)' \
    || die "$("$PY" --version 2>&1) is outside 3.8-3.11 (torch 2.1 wheels); set PY=python3.11"
  "$PY" -m venv "$VENV"
  say "created venv: $VENV ($("$VENV/bin/python" --version 2>&1))"
fi
if [[ ! -f "$VENV/.gitignore" ]]; then
  printf '*\n' >"$VENV/.gitignore"
  say "wrote $VENV/.gitignore (keeps the venv out of git)"
fi
VPY="$VENV/bin/python"
pip_install() { "$VPY" -m pip install --disable-pip-version-check "$@"; }
installed_version() {
  "$VPY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$1" 2>/dev/null || true
}

# build tools for the source builds below (--no-build-isolation uses the venv's own)
if [[ -n "$(installed_version wheel)" && -n "$(installed_version setuptools)" ]]; then
  say "build tools present, kept: setuptools $(installed_version setuptools), wheel $(installed_version wheel)"
else
  pip_install -q --upgrade pip setuptools wheel
  say "installed build tools: setuptools $(installed_version setuptools), wheel $(installed_version wheel)"
fi

# 2. torch with CUDA (11.6-12.1) ----------------------------------------------------------------
torch_cuda() { "$VPY" -c 'import torch; print(torch.version.cuda or "")' 2>/dev/null || true; }
cuda="$(torch_cuda)"
if [[ -n "$cuda" ]]; then
  say "torch present, kept: $(installed_version torch) (CUDA $cuda)"
else
  # shellcheck disable=SC2086  # TORCH_SPEC is a list of requirement specifiers
  pip_install $TORCH_SPEC --index-url "$TORCH_INDEX"
  cuda="$(torch_cuda)"
  [[ -n "$cuda" ]] || die "torch from $TORCH_INDEX has no CUDA build; VBench needs CUDA 11.6-12.1"
  say "installed torch $(installed_version torch) (CUDA $cuda) from $TORCH_INDEX"
fi

# 3. detectron2, before vbench -----------------------------------------------------------------
if [[ "${VBENCH_SKIP_DETECTRON2:-0}" == "1" ]]; then
  say "detectron2 skipped (VBENCH_SKIP_DETECTRON2=1): object class, multiple objects, color and spatial relationship will not run"
elif [[ -n "$(installed_version detectron2)" ]]; then
  say "detectron2 present, kept: $(installed_version detectron2)"
else
  say "building detectron2 from $DETECTRON2_SRC against torch $(installed_version torch) (several minutes)"
  pip_install --no-build-isolation "$DETECTRON2_SRC"
  say "installed detectron2 $(installed_version detectron2)"
fi

# 4. vbench (brings transformers==4.33.2 and its other pins) ------------------------------------
if [[ "$(installed_version vbench)" == "$VBENCH_VERSION" ]]; then
  say "vbench present, kept: $VBENCH_VERSION"
else
  # no build isolation: VBench's setup inspects the installed torch's CUDA version
  pip_install --no-build-isolation "vbench==$VBENCH_VERSION"
  say "installed vbench $(installed_version vbench)"
fi

# 5. checks -------------------------------------------------------------------------------------
[[ -n "$(torch_cuda)" ]] || die "vbench's install replaced torch with a build without CUDA; re-run with VBENCH_TORCH pins it accepts"
[[ -x "$VENV/bin/vbench" ]] || die "no vbench entry point at $VENV/bin/vbench"
"$VENV/bin/vbench" -h >/dev/null 2>&1 || die "'$VENV/bin/vbench -h' fails; run it to see why"
command -v wget >/dev/null || say "WARNING: wget not on PATH; VBench needs it to download its pretrained models"
say "ready: $VENV"
say "  torch $(installed_version torch) (CUDA $(torch_cuda)), transformers $(installed_version transformers), vbench $(installed_version vbench), detectron2 $(installed_version detectron2)"
say "  use: src.eval.vbench.run_vbench(videos_dir, out_dir, dimensions)  (python=$VPY)"
