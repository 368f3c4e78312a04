"""medcfx report / --report: one self-contained report.html, read back with a real HTML parser."""

from __future__ import annotations

import json
from html.parser import HTMLParser

from conftest import cli_env, run_cli


class _Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.imgs, self.external, self.rows, self.cells, self._in_td = [], [], [], [], False
        self.text = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img":
            self.imgs.append(a["src"])
        if tag in ("link", "script") and (a.get("href") or a.get("src")):
            self.external.append(a.get("href") or a.get("src"))
        if tag == "tr":
            self.rows.append([])
        if tag in ("td", "th"):
            self._in_td = True
            self.rows[-1].append("")

    def handle_endtag(self, tag):
        if tag in ("td", "th"):
            self._in_td = False

    def handle_data(self, data):
        self.text.append(data)
        if self._in_td:
            self.rows[-1][-1] += data


def _page(path):
    p = _Page()
    p.feed(path.read_text())
    return p


def test_explain_and_evaluate_reports_reference_only_existing_images(home, tmp_path):
    env = cli_env(home)
    data = tmp_path / "data"
    run_cli(["data", "demo", "brain", "--out", data, "--cases", "2", "--seed", "9"], env=env, check=0)
    out = tmp_path / "ex"
    run_cli(["explain", data, "--method", "threshold", "--out", out, "--report"], env=env, check=0)
    page = _page(out / "report.html")
    assert page.external == []  # self-contained: no external CSS/JS
    assert len(page.imgs) == 2 and all((out / src).is_file() for src in page.imgs)
    for src in page.imgs:  # the panel of the slice the provenance names as the most anomalous
        case = src.split("/")[0]
        k = json.loads((out / case / "provenance.json").read_text())["most_anomalous_slice"]
        assert src == f"{case}/panels/slice_{k:03d}.png"
    cases = [r[0] for r in page.rows[1:] if r and r[0].startswith("demo_")]
    assert sorted(cases) == ["demo_00000", "demo_00001"]

    ev = tmp_path / "ev"
    run_cli(["evaluate", "threshold", "--data", data, "--out", ev, "--n-resamples", "20", "--report"], env=env,
            check=0)
    metrics = json.loads((ev / "metrics.json").read_text())
    page = _page(ev / "report.html")
    shown = {r[0] for r in page.rows if r}
    assert {metrics["labels"][k] for k in metrics["metrics"]} <= shown
    assert page.imgs == [] and page.external == []
    # a folder without outputs is a one-line error
    bad = run_cli(["report", tmp_path], env=env)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1
