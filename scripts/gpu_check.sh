#!/usr/bin/env bash
# The GPU tier on one NVIDIA GPU: tests/gpu (real `aitrain` launches on cuda + nccl, bf16, NVML
# metrics and MFU, the fabric probe/tune on the real GPU, HF Trainer and Lightning jobs), then a
# compact summary to paste into a note. The whole run stays under GPU_CHECK_BUDGET_S (470 s:
# under 8 minutes); extra arguments go to pytest (`bash scripts/gpu_check.sh -k fabric`).
#
# Exit status: 0 every test passed; 1 a test failed; 2 nothing could be tested (no GPU, no CUDA
# torch, an install failed); 124 the time limit stopped the tests (the summary says where).
#
# Environment (defaults in brackets):
#   VENV [.venv]                     the virtual environment to use or create
#   PYTHON [python3]                 the interpreter that creates it
#   GPU_CHECK_BUDGET_S [470]         the limit of the whole run, installs included
#   GPU_CHECK_OUT [build/gpu_check]  pytest.log, results.jsonl, summary.txt
#   TORCH_SPEC [torch==2.13.0]       the torch to install when the venv has no CUDA build
#   TORCH_INDEX_URL [by the driver]  where that torch comes from (see below)
#   GPU_CHECK_FRAMEWORKS [1]         install what tests/frameworks/scripts import (transformers, lightning...)
#   GPU_CHECK_ALLOW_NO_GPU [0]       1: run anyway without a GPU (every test skips; checks the script itself)
#
# torch. scripts/test.sh installs with constraints.txt, whose torch==2.13.0 pin makes dev machines
# take the CPU wheel their pip configuration offers (a local wheel folder). Here torch must be a
# CUDA build, so this script never installs torch with that configuration: it installs TORCH_SPEC
# from TORCH_INDEX_URL only, with the machine's pip config files, find-links, extra indexes and
# constraints switched off. PyPI's torch 2.13.0 for Linux x86_64 *is* the CUDA build (CUDA 13.0; it
# pulls the nvidia-* CUDA, cuDNN and NCCL wheels) and needs a driver for CUDA >= 13.0 (>= 580); for
# a CUDA 12 driver (nvidia-smi says which CUDA it supports) the PyTorch index's cu128 or cu126 build
# is taken instead (TORCH_INDEX_URL overrides it). Everything else installs as scripts/test.sh does,
# but constrained to the CUDA torch in place instead of constraints.txt.
#
# No internet on the GPU machine: nothing is installed when the venv's torch already sees the GPU,
# and a venv that does not exist yet is created on top of the system's torch when that one sees the
# GPU (--system-site-packages), so only aitrain and the test tools need installing. When an install
# is needed and fails, the script says what to do and exits 2.
set -euo pipefail
cd "$(dirname "$0")/.."

T0=$SECONDS
BUDGET=${GPU_CHECK_BUDGET_S:-470}
PYTEST_RESERVE_S=${GPU_CHECK_PYTEST_RESERVE_S:-300}  # kept for the tests when installing
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
OUT=${GPU_CHECK_OUT:-build/gpu_check}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
FRAMEWORKS=${GPU_CHECK_FRAMEWORKS:-1}
ALLOW_NO_GPU=${GPU_CHECK_ALLOW_NO_GPU:-0}
PY="$VENV/bin/python"

mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
rm -f "$OUT/results.jsonl" "$OUT/pytest.log" "$OUT/summary.txt" "$OUT/facts.json"

say() { echo "== $* [$((SECONDS - T0))s]"; }
left() { echo $((BUDGET - (SECONDS - T0))); }

not_run() {  # a setup problem: say it, as the summary too, and stop
  echo "gpu_check: $*" >&2
  {
    echo "aitrain GPU check, $(date -u '+%Y-%m-%d %H:%M UTC'), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
    echo "NOT RUN: $*"
  } | tee "$OUT/summary.txt"
  exit 2
}

window=0
install_window() {  # sets $window: seconds installing $1 may take, keeping PYTEST_RESERVE_S for the tests
  window=$(($(left) - PYTEST_RESERVE_S))
  [ "$window" -ge 30 ] && return 0
  echo "gpu_check: no time left in GPU_CHECK_BUDGET_S=$BUDGET to install $1 and still run the tests;" \
    "run once with GPU_CHECK_BUDGET_S=1800 (later runs find it installed)" >&2
  return 1
}

clean_pip() {  # pip with only TORCH_INDEX_URL: no pip.conf, find-links, extra indexes or constraints
  env -u PIP_FIND_LINKS -u PIP_EXTRA_INDEX_URL -u PIP_INDEX_URL -u PIP_CONSTRAINT -u PIP_NO_INDEX \
    PIP_CONFIG_FILE=/dev/null "$@"
}

sees_cuda() {  # this interpreter's torch is a CUDA build and sees a GPU
  "$1" -c 'import sys, torch; sys.exit(0 if torch.version.cuda and torch.cuda.is_available() else 1)' \
    >/dev/null 2>&1
}

torch_says() {
  "$1" -c 'import torch; print(f"torch {torch.__version__}, CUDA build {torch.version.cuda}")' 2>/dev/null \
    || echo "no torch"
}

# -- the GPU ------------------------------------------------------------------------------------
DRIVER_CUDA=""
NO_GPU=0
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then
  say "nvidia-smi"
  nvidia-smi
  nvidia-smi --query-gpu=index,name,driver_version,pci.bus_id,pcie.link.gen.current,pcie.link.gen.max,pcie.link.width.current,pcie.link.width.max,memory.total \
    --format=csv
  DRIVER_CUDA=$(nvidia-smi | sed -n 's/.*CUDA Version: *\([0-9][0-9]*\.[0-9][0-9]*\).*/\1/p' | head -n1)
elif [ "$ALLOW_NO_GPU" = 1 ]; then
  say "no nvidia-smi: GPU_CHECK_ALLOW_NO_GPU=1, so the tests run and skip (and nothing optional is installed)"
  NO_GPU=1
else
  not_run "no NVIDIA GPU: nvidia-smi is missing or fails (GPU_CHECK_ALLOW_NO_GPU=1 runs the tier anyway: all skipped)"
fi

if [ -z "${TORCH_INDEX_URL:-}" ]; then
  # PyPI's torch 2.13.0 is built for CUDA 13.0; older drivers get the PyTorch index's CUDA 12 builds.
  case "$DRIVER_CUDA" in
    "" | 1[3-9].* | [2-9][0-9].*) TORCH_INDEX_URL=https://pypi.org/simple ;;
    12.[89] | 12.[1-9][0-9]) TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 ;;
    12.*) TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126 ;;  # CUDA minor version compatibility
    *) TORCH_INDEX_URL=https://pypi.org/simple
       echo "gpu_check: the driver supports CUDA $DRIVER_CUDA only: torch 2.13 needs CUDA 12 or newer; update the driver" >&2 ;;
  esac
fi
EXTRA_INDEX=()
[ "$TORCH_INDEX_URL" = https://pypi.org/simple ] || EXTRA_INDEX=(--extra-index-url https://pypi.org/simple)

# -- the venv and a CUDA torch --------------------------------------------------------------------
if [ -x "$PY" ] && sees_cuda "$PY"; then
  say "torch in $VENV sees the GPU: nothing to install for torch"
elif [ "$NO_GPU" = 1 ]; then
  [ -x "$PY" ] || not_run "no $VENV (create it with bash scripts/test.sh)"
  say "no GPU: keeping the torch in $VENV ($(torch_says "$PY"))"
else
  if [ ! -x "$PY" ] && sees_cuda "$PYTHON"; then
    say "creating $VENV on top of $PYTHON's torch, which sees the GPU ($(torch_says "$PYTHON"))"
    "$PYTHON" -m venv --system-site-packages "$VENV"
  else
    [ -x "$PY" ] || { say "creating $VENV"; "$PYTHON" -m venv "$VENV"; }
    say "installing $TORCH_SPEC (CUDA build) from $TORCH_INDEX_URL; $VENV has $(torch_says "$PY")"
    install_window "a CUDA torch" || not_run "no time to install a CUDA torch (GPU_CHECK_BUDGET_S=1800 once)"
    # --force-reinstall replaces a CPU build of the same version (2.13.0+cpu satisfies ==2.13.0);
    # pip downloads everything before it touches the venv, so a failed download changes nothing.
    if ! clean_pip timeout "$window" "$PY" -m pip install --progress-bar off --disable-pip-version-check --force-reinstall \
      --index-url "$TORCH_INDEX_URL" ${EXTRA_INDEX[@]+"${EXTRA_INDEX[@]}"} "$TORCH_SPEC"; then
      not_run "could not install $TORCH_SPEC from $TORCH_INDEX_URL into $VENV (no internet? took over ${window}s?)." \
        "Use a venv whose torch sees the GPU (VENV=...), or a python with one (PYTHON=..., then a new VENV=...)," \
        "or point TORCH_INDEX_URL at a reachable index with CUDA wheels"
    fi
  fi
  sees_cuda "$PY" || not_run "the torch in $VENV ($(torch_says "$PY")) does not see the GPU (the driver" \
    "supports CUDA ${DRIVER_CUDA:-?}); pick a build for it with TORCH_INDEX_URL=https://download.pytorch.org/whl/cuXYZ"
fi

# -- aitrain, the test tools, NVML, the frameworks -----------------------------------------------
TORCH_PIN="$OUT/torch-pin.txt"  # whatever else is installed must not replace the CUDA torch
"$PY" -c 'import torch; print("torch==" + torch.__version__.split("+")[0])' >"$TORCH_PIN" 2>/dev/null || : >"$TORCH_PIN"
if ! "$PY" -c 'import aitrain.launcher.cli, hydra, mlflow, pytest, pytest_timeout, yaml' >/dev/null 2>&1; then
  say "installing aitrain and its test extras into $VENV (pinned to the CUDA torch in place, not constraints.txt)"
  install_window "aitrain's dependencies" || not_run "no time to install aitrain (GPU_CHECK_BUDGET_S=1800 once)"
  timeout "$window" "$PY" -m pip install -q --disable-pip-version-check -c "$TORCH_PIN" -e '.[test,nvml]' 2>&1 \
    | grep -v "is ignored: it is neither a file nor a directory" || true
  "$PY" -c 'import aitrain.launcher.cli, hydra, mlflow, pytest, pytest_timeout, yaml' \
    || not_run "installing aitrain into $VENV failed (see above): pip install -e '.[test,nvml]' needs an index"
fi
if [ "$NO_GPU" = 0 ] && ! "$PY" -c 'import pynvml' >/dev/null 2>&1; then
  say "installing nvidia-ml-py (the nvml extra: GPU system metrics and MFU)"
  if ! { install_window nvidia-ml-py &&
    timeout "$window" "$PY" -m pip install -q --disable-pip-version-check 'nvidia-ml-py>=12'; }; then
    echo "gpu_check: WARNING: nvidia-ml-py is not installed: the NVML and MFU tests will be skipped" >&2
  fi
fi
if [ "$NO_GPU" = 0 ] && [ "$FRAMEWORKS" = 1 ] && compgen -G "tests/frameworks/scripts/*.py" >/dev/null; then
  missing=$(PYTHONPATH=tests:tests/gpu "$PY" -c '
import sys
from pathlib import Path
from gpu_testing import missing_imports, pip_names
mods = sorted({m for p in Path("tests/frameworks/scripts").glob("*.py") for m in missing_imports(p)})
print(pip_names(mods))' || true)
  if [ -n "$missing" ]; then
    say "installing what tests/frameworks/scripts import: $missing"
    # shellcheck disable=SC2086  # one word per package
    if ! { install_window "$missing" &&
      timeout "$window" "$PY" -m pip install -q --disable-pip-version-check -c "$TORCH_PIN" $missing; }; then
      echo "gpu_check: WARNING: $missing not installed: those framework tests will be skipped" >&2
    fi
  fi
fi

# -- versions --------------------------------------------------------------------------------------
say "versions"
"$PY" - "$OUT/facts.json" <<'EOF'
import importlib.metadata, json, platform, sys
import torch
f = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
     "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
     "gpus": [], "nccl": None}
try:
    v = torch.cuda.nccl.version()
    f["nccl"] = ".".join(map(str, v)) if isinstance(v, tuple) else str(v)
except Exception:
    pass
if torch.cuda.is_available():
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        f["gpus"].append(f"{p.name} (sm {p.major}.{p.minor}, {p.total_memory // 2**20} MiB)")
    f["bf16"] = torch.cuda.is_bf16_supported()
for dist in ("nvidia-ml-py", "transformers", "accelerate", "lightning", "pytorch-lightning", "mlflow"):
    try:
        f[dist] = importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        pass
json.dump(f, open(sys.argv[1], "w"))
for k, v in f.items():
    print(f"  {k}: {v}")
EOF

# -- the tests -------------------------------------------------------------------------------------
limit=$(($(left) - 15))
[ "$limit" -gt 30 ] || not_run "no time left for the tests (GPU_CHECK_BUDGET_S=$BUDGET)"
say "pytest tests/gpu (time limit ${limit}s)"
set +e
AITRAIN_GPU_RESULTS="$OUT/results.jsonl" timeout -k 10 "$limit" "$VENV/bin/pytest" tests/gpu -q -rs "$@" 2>&1 \
  | tee "$OUT/pytest.log"
rc=${PIPESTATUS[0]}
set -e

# -- the summary -----------------------------------------------------------------------------------
say "summary (also in $OUT/summary.txt)"
"$PY" tests/gpu/gpu_summary.py "$OUT" "$rc" "$((SECONDS - T0))" "$BUDGET" | tee "$OUT/summary.txt"

case "$rc" in
  0)
    if [ "$ALLOW_NO_GPU" != 1 ] && ! grep -q '"when": "call", "outcome": "passed"' "$OUT/results.jsonl" 2>/dev/null; then
      exit 2
    fi
    exit 0 ;;
  124 | 137) exit 124 ;;
  5) exit 2 ;;
  *) exit 1 ;;
esac
