"""The page: sections of escaped HTML, one stylesheet and one small script whose SHA-256 hashes are the only ones
the Content-Security-Policy allows, images as `data:` URIs, and the raw numbers embedded as JSON and as download
links. No network request is possible from it (`default-src 'none'`), and no inline `style=` attribute is used."""

from __future__ import annotations

import base64
import hashlib
import html
import json
import math
from dataclasses import dataclass, field
from typing import Any


def esc(v: Any) -> str:
    return html.escape(str(v), quote=True)


def fmt(v: Any, digits: int = 4) -> str:
    """How numbers print everywhere in the report (the same digits as `bigmodel evaluate`)."""
    if isinstance(v, bool) or v is None:
        return "" if v is None else str(v).lower()
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        return f"{v:.{digits}f}"
    return str(v)


@dataclass
class Section:
    id: str
    title: str
    body: str  # HTML
    level: int = 2


@dataclass
class Downloads:
    """Raw numbers behind the plots, as `data:` links named after the file they save as."""

    links: dict[str, str] = field(default_factory=dict)

    def add(self, name: str, content: str | bytes, mime: str) -> str:
        raw = content.encode("utf-8") if isinstance(content, str) else content
        uri = f"data:{mime};base64," + base64.b64encode(raw).decode("ascii")
        self.links[name] = uri
        return f'<a class="dl" download="{esc(name)}" href="{uri}">{esc(name)}</a>'

    def csv(self, name: str, header: list[str], rows: list[list[Any]]) -> str:
        import csv
        import io

        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(header)
        for r in rows:
            w.writerow(["" if v is None else repr(v) if isinstance(v, float) else v for v in r])
        return self.add(name, buf.getvalue(), "text/csv")

    def json(self, name: str, obj: Any) -> str:
        return self.add(name, json.dumps(obj, indent=1, sort_keys=True), "application/json")


def table(
    headers: list[str],
    rows: list[list[Any]],
    *,
    sortable: bool = False,
    cls: str = "",
    raw_html: bool = False,
) -> str:
    """A table; numbers are right-aligned and carry their exact value in `data-v` (what sorting compares)."""
    classes = " ".join(c for c in ("sortable" if sortable else "", cls) if c)
    out = [f'<table class="{classes}">' if classes else "<table>", "<thead><tr>"]
    out += [f"<th>{esc(h)}</th>" for h in headers]
    out.append("</tr></thead><tbody>")
    for r in rows:
        out.append("<tr>")
        for v in r:
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                out.append(f'<td class="num" data-v="{esc(repr(v))}">{esc(fmt(v))}</td>')
            else:
                out.append(f"<td>{v if raw_html else esc(fmt(v))}</td>")
        out.append("</tr>")
    out.append("</tbody></table>")
    return "".join(out)


def kv(rows: list[tuple[str, Any]]) -> str:
    """A two-column facts table (values already escaped when they are HTML)."""
    body = "".join(f"<tr><th>{esc(k)}</th><td>{v}</td></tr>" for k, v in rows)
    return f'<table class="kv"><tbody>{body}</tbody></table>'


def img(uri: str, alt: str, cls: str = "plot") -> str:
    return f'<img class="{cls}" src="{uri}" alt="{esc(alt)}">'


def note(text: str) -> str:
    return f'<p class="note">{esc(text)}</p>'


CSS = """
:root { color-scheme: light; --fg: #1d2430; --muted: #5b6576; --line: #d9dee7; --accent: #1f5fbf; }
* { box-sizing: border-box; }
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: var(--fg); margin: 0;
       background: #f6f7f9; }
header.top { background: #1d2430; color: #fff; padding: 14px 24px; }
header.top h1 { margin: 0; font-size: 20px; }
header.top p { margin: 4px 0 0; color: #c9d1dd; }
main { max-width: 1180px; margin: 0 auto; padding: 8px 24px 40px; }
nav.toc { margin: 12px 0; font-size: 13px; }
nav.toc a { margin-right: 14px; color: var(--accent); }
section { background: #fff; border: 1px solid var(--line); border-radius: 6px; padding: 10px 18px 16px;
          margin: 14px 0; }
section h2 { font-size: 17px; margin: 6px 0 10px; }
section h3 { font-size: 14px; margin: 14px 0 6px; }
table { border-collapse: collapse; margin: 6px 0 10px; font-size: 13px; }
th, td { border-bottom: 1px solid var(--line); padding: 3px 10px; text-align: left; vertical-align: top; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
table.kv th { color: var(--muted); font-weight: 500; }
table.sortable th { cursor: pointer; user-select: none; }
table.sortable th[data-dir="asc"]::after { content: " \\25B2"; }
table.sortable th[data-dir="desc"]::after { content: " \\25BC"; }
.plots { display: flex; flex-wrap: wrap; gap: 10px; align-items: flex-start; }
img.plot { max-width: 100%; height: auto; border: 1px solid #eef0f3; }
.note { color: var(--muted); font-style: italic; }
.status { display: inline-block; padding: 1px 8px; border-radius: 10px; font-size: 12px; background: #e3ecfa; }
.status.diverged, .status.incomplete { background: #fbe3e3; }
.status.early-stopped { background: #fff1d6; }
code, pre { font: 12px/1.4 ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; }
pre { background: #f3f5f8; padding: 8px 10px; border-radius: 4px; white-space: pre-wrap; word-break: break-word; }
.gallery { display: flex; flex-wrap: wrap; gap: 10px; }
.gallery figure { margin: 0; border: 1px solid var(--line); border-radius: 4px; padding: 6px; width: 220px;
                  font-size: 12px; }
.gallery figure.wide { width: 360px; }
.gallery img { display: block; margin: 0 auto 4px; image-rendering: pixelated; max-width: 100%; height: auto; }
.gallery figcaption b { color: #b3261e; }
.tok { border: 1px solid var(--line); border-radius: 3px; padding: 0 2px; margin: 1px; display: inline-block; }
a.dl { font-size: 12px; margin-right: 10px; color: var(--accent); }
details { margin: 10px 0; }
details > summary { cursor: pointer; font-weight: 600; }
""".strip()

SCRIPT = """
for (const th of document.querySelectorAll("table.sortable th")) {
  th.addEventListener("click", () => {
    const table = th.closest("table"), body = table.tBodies[0], i = th.cellIndex;
    const asc = th.dataset.dir !== "asc";
    for (const other of table.querySelectorAll("th")) delete other.dataset.dir;
    th.dataset.dir = asc ? "asc" : "desc";
    const key = (td) => (td.dataset.v !== undefined ? parseFloat(td.dataset.v) : td.textContent);
    const rows = [...body.rows].sort((a, b) => {
      const x = key(a.cells[i]), y = key(b.cells[i]);
      const c = typeof x === "number" && typeof y === "number" ? x - y : String(x).localeCompare(String(y));
      return asc ? c : -c;
    });
    body.append(...rows);
  });
}
""".strip()


def _sha256(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode("utf-8")).digest()).decode("ascii") + "'"


CSP = "; ".join(
    [
        "default-src 'none'",
        "img-src data:",
        f"style-src {_sha256(CSS)}",
        f"script-src {_sha256(SCRIPT)}",
        "base-uri 'none'",
        "form-action 'none'",
    ]
)


def page(title: str, subtitle: str, sections: list[Section], data: dict[str, Any]) -> str:
    """The whole document. `data` (the raw numbers) is embedded as a JSON block that is never executed."""
    toc = "".join(f'<a href="#{esc(s.id)}">{esc(s.title)}</a>' for s in sections if s.level == 2)
    body = "\n".join(
        f'<section id="{esc(s.id)}"><h{s.level}>{esc(s.title)}</h{s.level}>\n{s.body}\n</section>' for s in sections
    )
    blob = json.dumps(data, sort_keys=True, separators=(",", ":"), allow_nan=True).replace("</", "<\\/")
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f'<meta http-equiv="Content-Security-Policy" content="{esc(CSP)}">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        '<meta name="generator" content="bigmodel report">\n'
        f"<title>{esc(title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n"
        f'<header class="top"><h1>{esc(title)}</h1><p>{esc(subtitle)}</p></header>\n'
        f'<main>\n<nav class="toc">{toc}</nav>\n{body}\n</main>\n'
        f'<script type="application/json" id="report-data">{blob}</script>\n'
        f"<script>{SCRIPT}</script>\n</body>\n</html>\n"
    )
