"""The per-minute outcome histogram, drawn by pygal as a self-contained SVG."""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Mapping, Sequence
from typing import Any

import pygal
from pygal.style import Style

from image_crawler.outcomes import DUPLICATE, ERROR, OUTCOMES, SUCCESS

#: One colour per outcome, in the order of :data:`image_crawler.outcomes.OUTCOMES`.
_COLOURS = {SUCCESS: "#2e9e44", DUPLICATE: "#4a78c2", ERROR: "#d2413a"}

#: Minute steps a label may fall on; the chart uses the smallest giving at most ~12 labels.
_LABEL_STEPS = (1, 2, 5, 10, 15, 30, 60, 120, 180, 360, 720, 1440)
_MAX_LABELS = 12

_STYLE = Style(
    background="#ffffff",
    plot_background="#ffffff",
    foreground="#333333",
    foreground_strong="#111111",
    foreground_subtle="#d9d9d9",
    font_family="DejaVu Sans, Helvetica, Arial, sans-serif",
    label_font_size=12,
    major_label_font_size=12,
    legend_font_size=13,
    title_font_size=15,
    no_data_font_size=28,
    colors=tuple(_COLOURS[name] for name in OUTCOMES),
)


def outcomes_per_minute_svg(
    minutes: Sequence[dt.datetime],
    counts: Mapping[str, Sequence[int]],
    *,
    width: int = 900,
    height: int = 360,
) -> bytes:
    """A pygal StackedBar of ``counts[outcome][i]`` jobs ending in UTC minute ``minutes[i]``.

    ``minutes`` must be consecutive (the caller fills empty minutes with zeros) so the time
    axis has no holes. The SVG carries no script at all: pygal's tooltip script lives on a CDN,
    so each bar gets a native ``<title>`` tooltip instead.
    """
    chart = pygal.StackedBar(
        js=[],
        width=width,
        height=height,
        style=_STYLE,
        title=_title(minutes),
        legend_at_bottom=True,
        legend_at_bottom_columns=len(OUTCOMES),
        show_minor_x_labels=False,
        truncate_label=-1,
        margin_bottom=4,
        spacing=8,
        print_values=False,
        no_data_text="No outcomes yet",
    )
    spans_days = bool(minutes) and minutes[-1] - minutes[0] >= dt.timedelta(days=1)
    labels = [_label(minute, with_date=spans_days) for minute in minutes]
    chart.x_labels = labels
    step = _label_step(len(minutes))
    chart.x_labels_major = [
        label for minute, label in zip(minutes, labels, strict=True) if _on_step(minute, step)
    ]
    totals = [sum(counts[name][i] for name in OUTCOMES) for i in range(len(minutes))]
    chart.y_labels = _integer_ticks(max(totals, default=0))
    chart.range = (0, chart.y_labels[-1])
    for name in OUTCOMES:
        chart.add(name, list(counts[name]))
    chart.add_xml_filter(_ScriptlessBars(list(OUTCOMES)))
    svg: bytes = chart.render()
    return svg


def _title(minutes: Sequence[dt.datetime]) -> str:
    if not minutes:
        return "Outcomes per minute (UTC)"
    first, last = minutes[0], minutes[-1]
    end = last.strftime("%H:%M") if first.date() == last.date() else last.strftime("%Y-%m-%d %H:%M")
    return f"Outcomes per minute (UTC), {first:%Y-%m-%d %H:%M} – {end}"


def _label(minute: dt.datetime, *, with_date: bool) -> str:
    return minute.strftime("%m-%d %H:%M" if with_date else "%H:%M")


def _label_step(count: int) -> int:
    return next((step for step in _LABEL_STEPS if count / step <= _MAX_LABELS), _LABEL_STEPS[-1])


def _on_step(minute: dt.datetime, step: int) -> bool:
    return (minute.hour * 60 + minute.minute) % step == 0


def _integer_ticks(top: int) -> list[int]:
    """About five whole-number ticks from 0 to at least ``top`` (pygal would pick fractions)."""
    if top <= 0:
        return [0, 1]
    rough = top / 5
    magnitude = 10 ** math.floor(math.log10(rough)) if rough >= 1 else 1
    step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= rough)
    return list(range(0, math.ceil(top / step) * step + 1, step))


class _ScriptlessBars:
    """pygal XML filter: drop the inline config script, drop empty bars, give bars a ``<title>``.

    The script only feeds pygal's CDN tooltip code, which we do not load, and our
    Content-Security-Policy would refuse it anyway (a console error in the browser).
    Zero-height bars are invisible but would still weigh ~400 bytes each.
    """

    def __init__(self, series: list[str]) -> None:
        self.series = series

    def __call__(self, root: Any) -> Any:
        for parent in root.iter():
            for child in list(parent):
                if child.tag == "script":
                    parent.remove(child)
        for group in root.iter("g"):
            classes = (group.get("class") or "").split()
            if "series" not in classes:
                continue
            index = next(int(c.removeprefix("serie-")) for c in classes if c.startswith("serie-"))
            for bars in group.iter("g"):
                if bars.get("class") == "bars":
                    self._label_bars(bars, self.series[index])
        return root

    @staticmethod
    def _label_bars(bars: Any, name: str) -> None:
        for bar in list(bars):
            descriptions = {d.get("class", "").split()[0]: d.text for d in bar.iter("desc")}
            value = descriptions.get("value") or "0"
            if value == "0":
                bars.remove(bar)
                continue
            title = bar.makeelement("title", {})
            title.text = f"{descriptions.get('x_label', '')} UTC — {value} {name}"
            bar.insert(0, title)
