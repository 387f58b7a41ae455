#!/usr/bin/env bash
# The CUDA proof of the GPU worker (issue 15), in one script for a machine with an NVIDIA GPU.
#
#   bench/cuda_proof.sh fetch
#       On a machine that reaches PyPI (the session's own): download into .whl/ the wheels the
#       device machine lacks (pyzmq, sdnotify), for CPython 3.12 on x86-64 Linux. .whl/ is
#       git-ignored (.gitignore); name it in the device tool's `carry`.
#
#   OUT=DIR bench/cuda_proof.sh [STEP ...]
#       On the GPU machine, from the repository root. Makes a virtual environment over the
#       machine's python3 (its torch, psutil, msgpack, pytest, prometheus-client ...), installs
#       the carried wheels into it and points it at this checkout, then runs the steps (all, in
#       this order, by default) and saves each one's output under $OUT:
#         env     nvidia-smi, versions                               -> env.txt         (30 s)
#         marked  pytest -m gpu (the tests that need CUDA)           -> pytest-gpu.txt  (120 s)
#         warm    bench/gpu.py --model-mb $MODEL_MB --parts warm     -> bench-warm.md   (150 s)
#         tiers   bench/gpu.py --model-mb $MODEL_MB --parts tiers    -> bench-tiers.md  (210 s)
#         suites  the GPU worker's suites with their unmarked tests,
#                 which run on CUDA there ("auto" device)            -> pytest-cuda-suites.txt (90 s)
#         batching  bench/batching.py --device cuda (issue 21)       -> bench-batching.md (120 s)
#       and a one-line verdict per step in summary.txt. Each step runs under its time limit (in
#       brackets; the first five add up to 10 minutes, one device call; batching is a second
#       call, or the first with STEPS named); one that fails or times out
#       does not stop the others, and a second call can run the steps left, by name.
#       MODEL_MB defaults to 6000.
#
# To try it on the CPU, over the project's .venv (whose packages stand in for the machine's):
#   OUT=/tmp/proof MODEL_MB=256 BASE_PYTHON=.venv/bin/python WHEELS=none bench/cuda_proof.sh
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
WHEELS=${WHEELS:-$ROOT/.whl}
BASE_PYTHON=${BASE_PYTHON:-python3}  # the GPU machine's python3, with its torch

fetch() {
  mkdir -p "$WHEELS"
  "$BASE_PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$WHEELS" "pyzmq==27.3.0"
  # sdnotify is published as source only: build its (pure Python) wheel here.
  "$BASE_PYTHON" -m pip wheel -q --no-deps -w "$WHEELS" "sdnotify==0.3.2"
  ls -l "$WHEELS"
}

if [ "${1:-}" = fetch ]; then
  fetch
  exit
fi

: "${OUT:?set OUT to the directory for the results}"
MODEL_MB=${MODEL_MB:-6000}
STEPS=${*:-env marked warm tiers suites}
mkdir -p "$OUT"
SUMMARY=$OUT/summary.txt
: >"$SUMMARY"

# A venv over the machine's python3. That python3 may itself be a venv (it is on the device
# machine), and a venv made from it would see the base interpreter's packages, not its own: so
# its site-packages are added with a .pth file instead of trusting --system-site-packages alone.
VENV=${VENV:-/tmp/workerd-proof-venv}
"$BASE_PYTHON" -m venv --system-site-packages --without-pip "$VENV"
SITE=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
# (An "import" line, so that their own .pth files are read too, as site.addsitedir does.)
"$BASE_PYTHON" -c 'import site; print("import site; " + "; ".join(f"site.addsitedir({d!r})" for d in site.getsitepackages()))' \
  >"$SITE/_machine_python.pth"
# workerd from this checkout, without a build step (the machine has no network for build deps).
printf '%s\n%s\n' "$ROOT/daemon" "$ROOT/client" >"$SITE/_workerd_checkout.pth"
if compgen -G "$WHEELS/*.whl" >/dev/null; then
  "$BASE_PYTHON" -m pip install -q --no-index --no-deps --no-compile --target "$SITE" "$WHEELS"/*.whl
fi
PY=$VENV/bin/python
export PYTHONUNBUFFERED=1

step() {  # step NAME LIMIT_S FILE COMMAND...: run with a time limit, keep its output, note the verdict
  local name=$1 limit=$2 file=$3 started=$SECONDS rc
  shift 3
  echo "=== $name: $*" | tee "$OUT/$file"
  timeout --kill-after=5 "$limit" "$@" 2>&1 | tee -a "$OUT/$file"
  rc=${PIPESTATUS[0]}
  echo "$name: rc=$rc ($((SECONDS - started)) s)$([ "$rc" = 124 ] && echo ', timed out')" | tee -a "$SUMMARY"
}

for name in $STEPS; do
  case $name in
    env)
      step env 30 env.txt bash -c "nvidia-smi || true; $PY -c 'import sys, torch, zmq, workerd; \
print(sys.version); print(\"torch\", torch.__version__, \"cuda\", torch.cuda.is_available(), \
torch.cuda.get_device_name(0) if torch.cuda.is_available() else \"-\"); print(\"pyzmq\", zmq.__version__); \
print(\"workerd\", workerd.__file__)'; free -g; nproc"
      ;;
    marked)
      step marked 120 pytest-gpu.txt "$PY" -m pytest -m gpu tests -q -rA -p no:cacheprovider
      ;;
    suites)
      step suites 90 pytest-cuda-suites.txt "$PY" -m pytest -q -rfEs -p no:cacheprovider \
        tests/unit/test_tiers.py tests/unit/test_evictions.py tests/unit/test_placement.py \
        tests/integration/test_gpu.py tests/integration/test_gpu_tiers.py
      ;;
    warm)
      step warm 150 bench-warm.md "$PY" bench/gpu.py --model-mb "$MODEL_MB" --parts warm
      ;;
    tiers)
      step tiers 210 bench-tiers.md "$PY" bench/gpu.py --model-mb "$MODEL_MB" --parts tiers
      ;;
    batching)
      step batching 120 bench-batching.md "$PY" bench/batching.py --device cuda
      ;;
    *)
      echo "unknown step $name (steps: env marked suites warm tiers batching)" | tee -a "$SUMMARY"
      ;;
  esac
done
cat "$SUMMARY"
