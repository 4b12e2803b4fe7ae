"""A device's recent telemetry as per-minute series, drawn as small inline SVG line charts
(server-side: no chart library, nothing fetched from elsewhere)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from html import escape

# (receive time, served_by, ok, latency ms, completion tokens), as Fleet.telemetry_rows gives them.
Row = tuple[datetime, str, bool, float, int]


@dataclass(frozen=True)
class Series:
    name: str
    unit: str
    values: list[float | None]  # one per bucket; None: no data in it

    @property
    def last(self) -> float | None:
        return next((v for v in reversed(self.values) if v is not None), None)


@dataclass(frozen=True)
class Chart:
    title: str
    series: list[Series]


def _quantile(sorted_values: list[float], q: float) -> float | None:
    if not sorted_values:
        return None
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def telemetry_charts(
    rows: list[Row], now: datetime, window_s: float = 3600, bucket_s: float = 60
) -> list[Chart]:
    """Requests/min, tokens/s, error rate, latency p50/p95 and local vs cloud, per bucket over the
    window that ends ``now``."""
    n = max(1, int(window_s // bucket_s))
    start = now - timedelta(seconds=n * bucket_s)
    buckets: list[list[Row]] = [[] for _ in range(n)]
    for r in rows:
        i = int((r[0] - start).total_seconds() // bucket_s)
        if 0 <= i < n:
            buckets[i].append(r)
    per_min = 60.0 / bucket_s
    requests = [len(b) * per_min for b in buckets]
    tokens = [sum(r[4] for r in b) / bucket_s for b in buckets]
    errors: list[float | None] = [
        100.0 * sum(1 for r in b if not r[2]) / len(b) if b else None for b in buckets
    ]
    latencies = [sorted(r[3] for r in b if r[2]) for b in buckets]
    local = [sum(1 for r in b if r[1] == "local") * per_min for b in buckets]
    cloud = [sum(1 for r in b if r[1] == "cloud") * per_min for b in buckets]
    return [
        Chart("Requests per minute", [Series("requests", "/min", list(requests))]),
        Chart("Tokens per second", [Series("generated", "tok/s", list(tokens))]),
        Chart("Error rate", [Series("errors", "%", errors)]),
        Chart(
            "Latency",
            [
                Series("p50", "ms", [_quantile(v, 0.5) for v in latencies]),
                Series("p95", "ms", [_quantile(v, 0.95) for v in latencies]),
            ],
        ),
        Chart(
            "Served local vs cloud",
            [Series("local", "/min", list(local)), Series("cloud", "/min", list(cloud))],
        ),
    ]


_COLOURS = ("#2563eb", "#dc2626")


def svg(chart: Chart, width: int = 320, height: int = 90) -> str:
    """An accessible SVG line chart (role=img, a title naming the last values)."""
    values = [v for s in chart.series for v in s.values if v is not None]
    top = max(values, default=0.0) or 1.0
    n = max(len(s.values) for s in chart.series)
    step = width / max(1, n - 1)
    summary = ", ".join(
        f"{s.name} {s.last:.3g} {s.unit}" if s.last is not None else f"{s.name}: no data"
        for s in chart.series
    )
    parts = [
        f'<svg class="chart" viewBox="0 0 {width} {height + 14}" width="100%" role="img" '
        f'aria-label="{escape(chart.title)}: {escape(summary)}">',
        f"<title>{escape(chart.title)}: {escape(summary)}</title>",
        f'<line x1="0" y1="{height}" x2="{width}" y2="{height}" class="axis"/>',
        f'<text x="2" y="10" class="scale">{top:.3g}</text>',
    ]
    for colour, s in zip(_COLOURS, chart.series, strict=False):
        segments: list[list[str]] = [[]]
        for i, v in enumerate(s.values):
            if v is None:
                segments.append([])
                continue
            segments[-1].append(f"{i * step:.1f},{height - (v / top) * (height - 12):.1f}")
        for seg in segments:
            if len(seg) == 1:
                x, y = seg[0].split(",")
                parts.append(f'<circle cx="{x}" cy="{y}" r="2" fill="{colour}"/>')
            elif seg:
                parts.append(
                    f'<polyline fill="none" stroke="{colour}" stroke-width="1.5" points="{" ".join(seg)}"/>'
                )
    legend_x = 2
    for colour, s in zip(_COLOURS, chart.series, strict=False):
        label = f"{s.name} {s.last:.3g}{s.unit}" if s.last is not None else f"{s.name} –"
        parts.append(
            f'<text x="{legend_x}" y="{height + 12}" fill="{colour}" class="legend">{escape(label)}</text>'
        )
        legend_x += 8 + 7 * len(label)
    parts.append("</svg>")
    return "".join(parts)
