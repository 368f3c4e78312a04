# Sourced by scripts/demo and scripts/test: make sure .venv exists and holds this checkout's requirements.
# Idempotent and quick when nothing changed (a stamp keyed by pyproject.toml + constraints.txt).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${MEDCFX_VENV:-$ROOT/.venv}"
STAMP="$VENV/.medcfx-stamp"
want="$(cat "$ROOT/pyproject.toml" "$ROOT/constraints.txt" | sha256sum | cut -d' ' -f1)"
if [ ! -x "$VENV/bin/python" ] || [ "$(cat "$STAMP" 2>/dev/null)" != "$want" ]; then
  echo "setting up $VENV (CPU torch 2.13.0; one-time, about a minute)" >&2
  python3 -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  # the constraints file pins torch to the CPU build; pyproject.toml itself keeps a range users can live with
  "$VENV/bin/python" -m pip install -q -c "$ROOT/constraints.txt" -e "$ROOT[dev]"
  echo "$want" > "$STAMP"
fi
export PATH="$VENV/bin:$PATH"
cd "$ROOT"
