"""The compare report as one self-contained HTML page: tables, verdicts, plots embedded as base64."""

from __future__ import annotations

import base64
import html
from pathlib import Path

from lowbit.report.markdown import describe, tables, targets_line, verdicts
from lowbit.train.config import write_atomically

STYLE = """
body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:14px}
th,td{border:1px solid #ccc;padding:4px 8px;text-align:right}
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}
li.pass{color:#1a7f37}li.fail{color:#cf222e}li.unsure{color:#9a6700}
img{max-width:100%;border:1px solid #eee;margin:.5em 0}
"""


def _table(header, rows) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def write_html(results: dict, path: Path, images: dict[str, Path]) -> Path:
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>lowbit compare</title>",
        f"<style>{STYLE}</style></head><body><h1>lowbit compare</h1>",
        f"<p>{html.escape(describe(results))}</p><h2>Verdicts</h2><ul>",
    ]
    for name, line in verdicts(results):
        ok = None if name is None else results["recipes"][name]["meets_target"]
        kind = "pass" if ok else ("fail" if ok is False else "unsure")
        parts.append(f"<li class='{kind}'>{html.escape(line)}</li>")
    parts.append("</ul>")
    if targets := targets_line(results):
        parts.append(f"<p>{html.escape(targets)}</p>")
    for title, header, rows in tables(results):
        parts.append(f"<h2>{html.escape(title.split(' (')[0].split(':')[0])}</h2>")
        parts.append(f"<p>{html.escape(title)}.</p>" + (_table(header, rows) if header else ""))
    if images:
        parts.append("<h2>Plots</h2>")
    for key, image in images.items():
        data = base64.b64encode(Path(image).read_bytes()).decode("ascii")
        parts.append(f"<img alt='{html.escape(key)}' src='data:image/png;base64,{data}'>")
    parts.append("</body></html>")
    return write_atomically(path, "\n".join(parts) + "\n")  # parallel parts of a study
