"""The contact sheet of a run: samples.png and samples.html next to report.json.

A person checks a caption run by looking at it. The run keeps a sample of its rows with a
thumbnail each (stages/samples.py); ``SHEET_SIZE`` of those, evenly spaced in write order, become:

* ``samples.png``: a 4-column grid (Pillow) of 160 px thumbnails, each with its caption wrapped
  under it (cut after ``PNG_LINES`` lines);
* ``samples.html``: one self-contained page (jinja2 template, autoescaped; images inlined as
  data URIs) with the thumbnails at 256 px, every caption column in full, and the run's
  quarantined rows with their stage and reason (at most ``HTML_QUARANTINE_ROWS``).
"""

from __future__ import annotations

import base64
import io
from typing import Any, Optional

from capjob.schema import QUARANTINE
from capjob.stages.tables import TableWriter

SHEET_SIZE = 16
COLUMNS = 4
PNG_THUMB = 160
PNG_CELL_WIDTH = 220
PNG_LINES = 6
PNG_FONT_SIZE = 12
HTML_QUARANTINE_ROWS = 500


def pick_evenly(samples: list[dict[str, Any]], n: int = SHEET_SIZE) -> list[dict[str, Any]]:
    """n samples spread evenly over the list (ordered by write time): the first, the last and
    equal steps between. All of them when there are n or fewer."""
    if len(samples) <= n:
        return list(samples)
    step = (len(samples) - 1) / (n - 1)
    return [samples[round(i * step)] for i in range(n)]


def _caption_text(sample: dict[str, Any]) -> str:
    captions = sample.get("captions") or {}
    if len(captions) == 1:
        return str(next(iter(captions.values())) or "")
    return "  ".join(f"[{name.removeprefix('caption_')}] {text}" for name, text in captions.items())


def wrap_to_width(text: str, width_of: Any, max_width: float) -> list[str]:
    """Greedy word wrap by rendered width (width_of: text -> pixels); a word wider than a line
    is cut between characters."""
    lines: list[str] = []
    line = ""
    for word in " ".join(text.split()).split(" "):
        candidate = f"{line} {word}" if line else word
        if width_of(candidate) <= max_width:
            line = candidate
            continue
        if line:
            lines.append(line)
        line = ""
        for ch in word:
            if width_of(line + ch) > max_width and line:
                lines.append(line)
                line = ""
            line += ch
    if line:
        lines.append(line)
    return lines


def _font(size: int) -> Any:
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)  # FreeType build: a scalable font
    except TypeError:  # pragma: no cover - Pillow < 10.1
        return ImageFont.load_default()


def render_png(samples: list[dict[str, Any]], title: str = "") -> bytes:
    """The grid as PNG bytes (a single "no captioned rows" panel when samples is empty)."""
    from PIL import Image, ImageDraw

    font = _font(PNG_FONT_SIZE)
    title_font = _font(PNG_FONT_SIZE + 2)
    line_h = PNG_FONT_SIZE + 4
    cell_h = PNG_THUMB + 10 + PNG_LINES * line_h + 10
    rows = max(1, -(-len(samples) // COLUMNS))
    top = 30 if title else 8
    sheet = Image.new("RGB", (COLUMNS * PNG_CELL_WIDTH, top + rows * cell_h), "white")
    draw = ImageDraw.Draw(sheet)
    if title:
        draw.text((8, 8), title, fill="black", font=title_font)
    if not samples:
        draw.text((8, top + 8), "no captioned rows in this run", fill="gray", font=font)
    for i, sample in enumerate(samples):
        x, y = (i % COLUMNS) * PNG_CELL_WIDTH, top + (i // COLUMNS) * cell_h
        thumb = Image.open(io.BytesIO(sample["thumbnail"])).convert("RGB")
        thumb.thumbnail((PNG_THUMB, PNG_THUMB))
        sheet.paste(thumb, (x + (PNG_CELL_WIDTH - thumb.width) // 2, y + (PNG_THUMB - thumb.height) // 2))
        lines = wrap_to_width(_caption_text(sample), lambda t: draw.textlength(t, font=font), PNG_CELL_WIDTH - 12) or ["(empty caption)"]
        if len(lines) > PNG_LINES:
            lines = lines[: PNG_LINES - 1] + [lines[PNG_LINES - 1][:-1] + "\u2026"]
        for j, line in enumerate(lines):
            draw.text((x + 6, y + PNG_THUMB + 10 + j * line_h), line, fill="black", font=font)
    buf = io.BytesIO()
    sheet.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


HTML_TEMPLATE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>capjob run {{ run_id }}: samples</title>
<style>
body { font-family: sans-serif; margin: 1.5em; color: #222; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(280px, 1fr)); gap: 1em; }
figure { margin: 0; border: 1px solid #ddd; padding: .5em; }
figure img { display: block; margin: 0 auto .5em; max-width: 256px; max-height: 256px; }
figcaption { font-size: .9em; white-space: pre-wrap; overflow-wrap: anywhere; }
.key { color: #777; font-size: .8em; overflow-wrap: anywhere; }
table { border-collapse: collapse; font-size: .9em; }
td, th { border: 1px solid #ddd; padding: .3em .5em; text-align: left; vertical-align: top; overflow-wrap: anywhere; }
</style></head>
<body>
<h1>capjob run {{ run_id }}</h1>
<p>{{ samples|length }} of {{ captioned }} captioned images, spread evenly over the run; {{ quarantined_total }} quarantined.</p>
<div class="grid">
{% for s in samples %}<figure>
<img src="data:image/jpeg;base64,{{ s.image_b64 }}" alt="{{ s.source_key }}">
{% for name, text in s.captions.items() %}<figcaption>{% if s.captions|length > 1 %}<b>{{ name }}</b>: {% endif %}{{ text }}</figcaption>
{% endfor %}<div class="key">{{ s.source_key }}</div>
</figure>
{% endfor %}</div>
<h2>Quarantined ({{ quarantined_total }})</h2>
{% if quarantined %}<table><tr><th>source key</th><th>stage</th><th>reason</th></tr>
{% for q in quarantined %}<tr><td>{{ q.source_key }}</td><td>{{ q.stage }}</td><td>{{ q.reason }}</td></tr>
{% endfor %}</table>{% if quarantined_total > quarantined|length %}<p>First {{ quarantined|length }} shown; all are in the sink's quarantine/ files.</p>{% endif %}
{% else %}<p>None.</p>{% endif %}
</body></html>
"""


def render_html(samples: list[dict[str, Any]], quarantined: list[dict[str, Any]], run_id: str, captioned: int) -> bytes:
    """samples.html (UTF-8): every value HTML-escaped by jinja2's autoescape."""
    import jinja2

    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined)
    view = [{**s, "image_b64": base64.b64encode(s["thumbnail"]).decode("ascii")} for s in samples]
    html = env.from_string(HTML_TEMPLATE).render(
        run_id=run_id, samples=view, captioned=captioned,
        quarantined=quarantined[:HTML_QUARANTINE_ROWS], quarantined_total=len(quarantined),
    )
    return html.encode("utf-8")


def contact_sheet(samples: list[dict[str, Any]], quarantined: list[dict[str, Any]], run_id: str,
                  captioned: Optional[int] = None) -> dict[str, bytes]:
    """{"samples.png": ..., "samples.html": ...} for a run. samples: the sink's thumbnail rows
    (id, source_key, captions {column: text}, thumbnail JPEG bytes), in write order;
    quarantined: the run's quarantine rows (source_key, stage, reason)."""
    chosen = pick_evenly(samples)
    captioned = len(samples) if captioned is None else captioned
    return {
        "samples.png": render_png(chosen, title=f"capjob run {run_id}: {len(chosen)} of {captioned} captioned"),
        "samples.html": render_html(chosen, quarantined, run_id, captioned),
    }


def run_contact_sheet(writer: TableWriter, run_id: str, samples: list[dict[str, Any]], captioned: int) -> dict[str, bytes]:
    """contact_sheet() with this run's quarantine rows read back from the sink (`writer`: its TableWriter)."""
    table = writer.read(QUARANTINE, columns=None)
    rows = [r for r in table.to_pylist() if r.get("run_id") == run_id] if table.num_rows else []
    return contact_sheet(samples, rows, run_id, captioned)
