#!/usr/bin/env bash
# Render an explain report (demo brains, the bundled sanchez model, calibrated) in headless Chromium
# (Debian's `chromium` package) and save the screenshot shown in docs/dataset-scale.md.
# Usage: benchmarks/report_screenshot.sh [WORK] [OUT.png]   (default: a temp folder, docs/img/report.png)
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
WORK="${1:-$(mktemp -d)}"
SHOT="$(realpath -m "${2:-$ROOT/docs/img/report.png}")"
export MEDCFX_HOME="$WORK/home" MEDCFX_CACHE="$WORK/cache"
cd "$WORK"
[ -d val ] || medcfx data demo brain --out val --cases 2 --seed 21 >/dev/null
[ -d test ] || medcfx data demo brain --out test --cases 3 --seed 22 >/dev/null
medcfx calibrate sanchez-demo --data val --max-slices 8 >/dev/null
# one slice per case at the tumour level (the demo volumes have 155 slices) keeps it to a minute on a CPU
medcfx explain test --method sanchez --out out --slice 80 --min-size 10 --report >/dev/null
chromium --headless --no-sandbox --disable-gpu --hide-scrollbars --window-size=1280,1600 \
  --screenshot="$SHOT" "file://$WORK/out/report.html" 2>/dev/null
echo "wrote $SHOT from $WORK/out/report.html"
