#!/usr/bin/env bash
# GPU check (issue 19, item 4): training steps/s of the sanchez paper preset (fp32, bf16 autocast) and the time
# of one slice counterfactual with torch CUDA fp32 / bf16, onnxruntime's CUDA provider with IO binding and
# onnxruntime's TensorRT provider, on one CUDA device, in at most --budget seconds (default 480, setup included).
#
#   bash benchmarks/gpu_check.sh [--out DIR] [--wheels DIR] [--dry] [--device cpu] [--python PY] [--budget S]
#   bash benchmarks/gpu_check.sh --make-wheels DIR     # on a machine with network: the wheels for --wheels
#
# --out DIR     results.md, results.json, stages.log and setup.log go here (default: $OUT, else ./gpu-check)
# --wheels DIR  make a venv (seeing the packages of PY, e.g. a CUDA torch) and install every wheel in DIR into
#               it with `pip install --no-index --find-links DIR` (offline). Without --wheels: PY itself when
#               medcfx, torch and onnxruntime import there; else this checkout is installed offline into a
#               venv over PY (no dependencies fetched); what is still missing is listed in the results.
# --dry         the same stages on tiny sizes (a few seconds each; CPU unless a GPU is there): the test's mode
# --device cpu  with --dry: stay on the CPU even where a GPU is present
# --python PY   the interpreter to start from (default: $PYTHON, else python3)
#
# Every stage runs in its own process with its own time limit; a stage that fails, crashes or runs out of
# time is a row with its reason and the others still run. Details: benchmarks/gpu_check.py.
set -u

START=$(date +%s)
COMMAND="bash benchmarks/gpu_check.sh $*"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT_DIR="${OUT:-}"
WHEELS=""
DRY=""
DEVICE="auto"
PY="${PYTHON:-python3}"
BUDGET=480
MAKE_WHEELS=""

while [ $# -gt 0 ]; do
    case "$1" in
        --out) OUT_DIR="${2:?--out needs a folder}"; shift 2 ;;
        --wheels) WHEELS="${2:?--wheels needs a folder}"; shift 2 ;;
        --dry) DRY="--dry"; shift ;;
        --device) DEVICE="${2:?--device needs auto or cpu}"; shift 2 ;;
        --python) PY="${2:?--python needs an interpreter}"; shift 2 ;;
        --budget) BUDGET="${2:?--budget needs seconds}"; shift 2 ;;
        --make-wheels) MAKE_WHEELS="${2:?--make-wheels needs a folder}"; shift 2 ;;
        -h|--help) sed -n '2,20p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "gpu_check.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
    esac
done

if ! command -v "$PY" >/dev/null 2>&1; then
    echo "gpu_check.sh: no Python interpreter '$PY' (give one with --python)" >&2
    exit 2
fi

if [ -n "$MAKE_WHEELS" ]; then
    # medcfx itself and nibabel (pure Python; the GPU machine's image lacks it and the demo brains are NIfTI)
    mkdir -p "$MAKE_WHEELS" || exit 1
    "$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$MAKE_WHEELS" "$ROOT" || exit 1
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 -d "$MAKE_WHEELS" "nibabel>=5" || exit 1
    ls -l "$MAKE_WHEELS"
    exit 0
fi

OUT_DIR="${OUT_DIR:-gpu-check}"
mkdir -p "$OUT_DIR" || exit 1
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/medcfx-gpu-check.XXXXXX")" || exit 1
trap 'rm -rf "$WORK"' EXIT
SETUP_LOG="$OUT_DIR/setup.log"
: > "$SETUP_LOG"
SETUP=""

note() {  # one line for the results' "setup" field and the setup log
    SETUP="${SETUP:+$SETUP; }$*"
    echo "setup: $*" | tee -a "$SETUP_LOG"
}

imports() {  # imports MODULE... : the ones that do not import with $PY (run outside the checkout, as the driver
    local m bad=""  # sees it: a plain `import medcfx` in the repository root would find the source folder)
    for m in "$@"; do
        (cd "$WORK" && "$PY" -c "import $m") >/dev/null 2>&1 || bad="$bad $m"
    done
    echo "${bad# }"
}

registered() {  # true when the sanchez method plugin is installed (its entry point is what `medcfx train` finds)
    (cd "$WORK" && "$PY" -c "import sys, importlib.metadata as m; import medcfx_sanchez
sys.exit(not any(e.name == 'sanchez' for e in m.entry_points(group='medcfx')))") >/dev/null 2>&1
}

make_venv() {  # a venv whose interpreter also sees the packages of $PY (torch with CUDA on the GPU machine)
    local base="$PY" site
    "$base" -m venv --without-pip "$WORK/venv" >>"$SETUP_LOG" 2>&1 || { note "python -m venv failed (see setup.log)"; return 1; }
    PY="$WORK/venv/bin/python"
    site="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" || return 1
    "$base" -c 'import sys; print("\n".join(p for p in sys.path if p.rstrip("/").endswith(("site-packages", "dist-packages"))))' \
        > "$site/_gpu_check_base.pth" || return 1
    note "venv $WORK/venv over $("$base" -c 'import sys; print(sys.executable)')"
}

pip_install() {  # pip_install ARGS... into $PY, at most 180 s, its output in the setup log
    timeout 180 "$PY" -m pip install --no-input --disable-pip-version-check "$@" >>"$SETUP_LOG" 2>&1
}

if [ -n "$WHEELS" ]; then
    shopt -s nullglob
    wheels=("$WHEELS"/*.whl)
    shopt -u nullglob
    if [ ${#wheels[@]} -eq 0 ]; then
        note "no wheels in --wheels $WHEELS: using $PY as it is"
    elif make_venv; then
        if pip_install --no-index --find-links "$WHEELS" "${wheels[@]}"; then
            note "installed ${#wheels[@]} wheel(s) from $WHEELS: $(cd "$WHEELS" && ls -- *.whl | tr '\n' ' ')"
        else
            note "pip could not install the wheels with their dependencies from $WHEELS and the base environment ($(tail -n 1 "$SETUP_LOG")); installing them without dependencies"
            pip_install --no-index --no-deps "${wheels[@]}" || note "pip install --no-deps failed too: $(tail -n 1 "$SETUP_LOG")"
        fi
    fi
else
    if [ -z "$(imports medcfx)" ] && registered; then
        note "using $PY as it is (medcfx and its method plugins are installed there)"
    elif [ -z "$(imports torch)" ] && make_venv; then
        # this checkout, offline and without dependencies: its entry points register the method plugins
        if pip_install --no-index --no-deps --no-build-isolation "$ROOT"; then
            note "installed this checkout into the venv (no dependencies fetched)"
        else
            note "pip could not install this checkout ($(tail -n 1 "$SETUP_LOG")); running from the source tree (no plugin entry points: training cannot run)"
            export PYTHONPATH="$ROOT:$ROOT/plugins${PYTHONPATH:+:$PYTHONPATH}"
        fi
    else
        note "using $PY as it is, without torch: the stages will say what is missing"
    fi
fi
missing="$(imports torch onnxruntime nibabel medcfx)"
[ -n "$missing" ] && note "still missing: $missing (the env stage says which stages need them)"

left=$((START + BUDGET - $(date +%s)))
if [ "$left" -lt 30 ]; then
    note "the setup used the whole budget"
    left=30
fi
timeout --kill-after=5 $((left - 5)) "$PY" "$ROOT/benchmarks/gpu_check.py" --out "$OUT_DIR" --work "$WORK" $DRY \
    --device "$DEVICE" --budget "$BUDGET" --started "$START" --setup-note "$SETUP" --command "$COMMAND"
rc=$?
if [ ! -s "$OUT_DIR/results.md" ]; then  # the driver could not even start: say so where the results go
    {
        echo "# medcfx GPU check: no results"
        echo
        echo "The driver (benchmarks/gpu_check.py) ended with exit status $rc before its first stage."
        echo "Setup: ${SETUP:-nothing to note}"
        echo
        echo '```'
        tail -n 30 "$SETUP_LOG"
        echo '```'
    } > "$OUT_DIR/results.md"
fi
exit $rc
