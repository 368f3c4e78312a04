"""``medcfx report OUT/``: one self-contained ``report.html`` for an explain or evaluate output folder.

Self-contained: inline CSS and a few lines of inline JavaScript (click a column head to sort), no external
resources; images are the PNG panels explain already wrote, referenced by relative path (the report moves
with its folder). What it shows:

- explain output (``summary.json`` from :mod:`medcfx.batch`, else every case folder's ``provenance.json``):
  the summary table (case, status, decision, image score, lesion size, components, self-check, warning,
  error) and per case the panel of its most anomalous slice (input | counterfactual | heatmap with the
  mask's outline | reference mask when annotated), with the model and the settings;
- evaluate output (``metrics.json``): every metric with its 95 % interval, the per-case table and the
  settings.
"""

from __future__ import annotations

import html
import json
from pathlib import Path

from medcfx import staging
from medcfx.errors import UsageError

__all__ = ["write_report_html"]

_CSS = """body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}table{border-collapse:collapse;margin:1em 0}
th,td{border:1px solid #ccc;padding:3px 8px;text-align:left;font-size:14px}th{background:#eee;cursor:pointer}
.case{margin:1.5em 0}.case img{max-width:100%;image-rendering:pixelated}.warn{color:#a40}.fail{color:#b00}
code{background:#f4f4f4;padding:1px 3px}"""
_JS = """document.querySelectorAll('table.sortable th').forEach((th,i)=>th.addEventListener('click',()=>{
const t=th.closest('table'),b=t.tBodies[0],rows=[...b.rows],asc=th.dataset.asc!=='1';th.dataset.asc=asc?'1':'0';
const v=r=>{const s=r.cells[i].innerText,n=parseFloat(s);return isNaN(n)?s:n};
rows.sort((a,c)=>{const x=v(a),y=v(c);return (x>y?1:x<y?-1:0)*(asc?1:-1)});rows.forEach(r=>b.appendChild(r))}));"""


def _cell(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return html.escape("" if v is None else str(v))


def _table(rows: list[dict], columns: list[str], cls: str = "sortable") -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{_cell(r.get(c))}</td>" for c in columns) + "</tr>" for r in rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _read(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _explain_section(out: Path) -> str:
    summary = _read(out / "summary.json")
    folders = sorted(f for f in out.iterdir() if f.is_dir() and (f / "provenance.json").exists()
                     and not f.name.startswith("."))
    rows = summary["cases"] if summary else [{"case": f.name, "status": "ok"} for f in folders]
    cols = [c for c in ("case", "status", "decision", "image_score", "lesion_size", "unit", "n_components",
                        "self_check_error", "warning", "error") if any(r.get(c) not in (None, "") for r in rows)]
    parts = [f"<h2>Cases ({len(rows)})</h2>", _table(rows, cols)]
    settings_shown = False
    for f in folders:
        prov = _read(f / "provenance.json") or {}
        if not settings_shown:
            model = (f"<code>{html.escape(str(prov['model']))}</code> (sha256 "
                     f"{html.escape(str(prov.get('model_sha256') or '')[:12])})" if prov.get("model") else "none")
            parts.append(f"<p>Model {model}, method "
                         f"<code>{html.escape(str(prov.get('method')))}</code>, medcfx "
                         f"{html.escape(str(prov.get('medcfx_version')))}; settings: "
                         + ", ".join(f"{html.escape(str(k))} = {_cell(v)}" for k, v in (prov.get("params") or {}).items()
                                     if not isinstance(v, (dict, list))) + "</p>")
            settings_shown = True
        k = prov.get("most_anomalous_slice")
        panel = f / "panels" / f"slice_{int(k):03d}.png" if k is not None else None
        if panel is None or not panel.exists():  # an output older than the most_anomalous_slice record
            pngs = sorted((f / "panels").glob("*.png")) if (f / "panels").is_dir() else []
            panel = pngs[len(pngs) // 2] if pngs else None
            k = panel.stem.rpartition("_")[2].lstrip("0") or "0" if panel is not None else "?"
        d = prov.get("decision") or {}
        line = [f"<b>{html.escape(f.name)}</b>"]
        if d:
            size = next((f"{v:.3g} {k[12:]}" for k, v in d.items() if k.startswith("lesion_size_")), "")
            line.append(f"{html.escape(d.get('decision', ''))} at {html.escape(d.get('operating_point', ''))} "
                        f"(score &gt; {d.get('threshold', 0):.4g}): {d.get('n_components')} component(s), {size}")
        check = prov.get("self_check") or {}
        if check.get("flagged"):
            line.append('<span class="warn">inversion self-check above its limit: the heatmap shows '
                        'reconstruction error too</span>')
        img = ""
        if panel is not None:
            rel = panel.relative_to(out).as_posix()
            img = f'<img src="{html.escape(rel)}" alt="{html.escape(f.name)} slice {html.escape(str(k))}">'
        parts.append(f'<div class="case"><p>{" &middot; ".join(line)}</p>{img}'
                     f"<p>slice {html.escape(str(k))} of the input; all slices in "
                     f"<code>{html.escape(f.name)}/panels/</code></p></div>")
    return "\n".join(parts)


def _evaluate_section(metrics: dict) -> str:
    labels, ci = metrics.get("labels", {}), metrics.get("intervals", {})
    rows = []
    for key, value in metrics.get("metrics", {}).items():
        iv = ci.get(key, {})
        rows.append({"metric": labels.get(key, key), "value": value, "95 % CI low": iv.get("ci_low"),
                     "95 % CI high": iv.get("ci_high")})
    per_case = metrics.get("per_case", [])
    skip = {"metrics", "intervals", "labels", "per_case", "title"}
    settings = {k: v for k, v in metrics.items() if k not in skip}
    return ("<h2>Metrics</h2><p>95 % percentile-bootstrap intervals over cases.</p>"
            + _table(rows, ["metric", "value", "95 % CI low", "95 % CI high"])
            + f"<h2>Per case ({len(per_case)})</h2>" + (_table(per_case, list(per_case[0])) if per_case else "")
            + "<h2>Settings</h2><ul>" + "".join(f"<li>{html.escape(str(k))}: {_cell(v) if not isinstance(v, (dict, list)) else html.escape(json.dumps(v))}</li>"
                                              for k, v in settings.items()) + "</ul>")


def write_report_html(out: str | Path) -> Path:
    """Write ``out/report.html`` (atomically) for an explain or evaluate output folder; returns its path.
    UsageError when ``out`` is not a folder or holds neither explain outputs nor ``metrics.json``."""
    out = Path(out)
    if not out.is_dir():
        raise UsageError(f"{out}: not a folder (give an explain or evaluate --out folder)")
    metrics = _read(out / "metrics.json")
    has_cases = (out / "summary.json").exists() or any((f / "provenance.json").exists() for f in out.iterdir()
                                                        if f.is_dir())
    if metrics is None and not has_cases:
        raise UsageError(f"{out}: no explain outputs (case folders with provenance.json) and no metrics.json")
    title = html.escape(metrics.get("title", out.name) if metrics else f"medcfx explain: {out.name}")
    body = (_evaluate_section(metrics) if metrics else "") + (_explain_section(out) if has_cases else "")
    page = (f"<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>{title}</title><style>{_CSS}</style>"
            f"</head><body><h1>{title}</h1>{body}<script>{_JS}</script></body></html>\n")
    staging.atomic_write_bytes(out / "report.html", page.encode("utf-8"))
    return out / "report.html"
