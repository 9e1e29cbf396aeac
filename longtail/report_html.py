"""`longtail report --html FILE`: the report as one self-contained page (no scripts, no external files).

The tables of `report`, then per row a plot of per-class test accuracy (mean over the row's seeds)
against the class's training-set size on a log axis, drawn as inline SVG so the page needs nothing
but a browser.
"""
from __future__ import annotations

import html
import math
import statistics
from typing import Optional

from longtail.report import (ENV_HEADER, Group, columns_for, environment_cells, find_baseline, group_row, group_runs,
                             more_rows, paired_cell, paired_rows)

_STYLE = """body{font-family:system-ui,sans-serif;margin:2em;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:90%}th,td{border:1px solid #ccc;padding:3px 6px;text-align:left}
th{background:#f2f2f2}figure{display:inline-block;margin:1em 2em 1em 0}figcaption{font-size:90%;max-width:480px}
.many{fill:#1f77b4}.medium{fill:#ff7f0e}.few{fill:#d62728}svg text{font-size:11px;fill:#222}"""

_W, _H, _L, _R, _T, _B = 480, 300, 50, 30, 15, 40  # plot size and margins, px


def _table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _per_class(group: Group) -> list[tuple[int, float, str]]:
    """(train count, mean accuracy over the seeds, group name) for every class present in the test split."""
    first = group.results[0]
    counts = first.get("class_counts") or []
    many, few = first.get("thresholds") or [100, 20]
    points = []
    for k, n in enumerate(counts):
        accs = [r["per_class"][k] for r in group.results if r.get("per_class") and r["per_class"][k] is not None]
        if accs and n > 0:
            points.append((n, statistics.mean(accs), "many" if n > many else "few" if n < few else "medium"))
    return points


def per_class_svg(group: Group) -> str:
    """Per-class accuracy (%, y) against training images (log x), one dot per class, coloured by group."""
    points = _per_class(group)
    if not points:
        return "<p>(no per-class accuracy recorded)</p>"
    lo = math.floor(math.log10(min(n for n, _, _ in points)))
    hi = max(math.ceil(math.log10(max(n for n, _, _ in points))), lo + 1)
    x = lambda n: _L + (math.log10(n) - lo) / (hi - lo) * (_W - _L - _R)  # noqa: E731
    y = lambda a: _T + (100 - a) / 100 * (_H - _T - _B)  # noqa: E731
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{_W}" height="{_H}" role="img" '
             f'aria-label="per-class accuracy against class size">',
             f'<rect x="{_L}" y="{_T}" width="{_W - _L - _R}" height="{_H - _T - _B}" fill="none" stroke="#888"/>']
    for a in (0, 25, 50, 75, 100):
        parts.append(f'<text x="{_L - 6}" y="{y(a) + 4:.1f}" text-anchor="end">{a}</text>')
    for e in range(lo, hi + 1):
        parts.append(f'<text x="{x(10 ** e):.1f}" y="{_H - _B + 15}" text-anchor="middle">{10 ** e:g}</text>')
    parts.append(f'<text x="{(_W + _L) / 2}" y="{_H - 5}" text-anchor="middle">training images of the class (log)</text>')
    parts.append(f'<text x="12" y="{(_H - _B) / 2}" transform="rotate(-90 12 {(_H - _B) / 2})" '
                 'text-anchor="middle">test accuracy, %</text>')
    for n, acc, name in points:
        parts.append(f'<circle class="{name}" cx="{x(n):.1f}" cy="{y(acc):.1f}" r="3.5"><title>{n} images: '
                     f'{acc:.1f} % ({name})</title></circle>')
    parts.append("</svg>")
    return "".join(parts)


def report_html(run_dirs: list[str], baseline: Optional[str] = None, title: str = "longtail report") -> str:
    groups = group_runs(run_dirs)
    columns, paired_columns = columns_for(groups)
    header = ["Run", "Data", "Model", "Recipe", "Epochs", "Seeds", "tau"] + [t for t, _ in columns] + ENV_HEADER
    body = [f"<h1>{html.escape(title)}</h1>",
            "<p>Accuracies and ECE in %, mean ± sample standard deviation over the seeds of a row.</p>",
            _table(header, [group_row(g.name, g.results, columns) + environment_cells(g) for g in groups])]
    if baseline is not None:
        base = find_baseline(groups, baseline)
        body += [f"<h2>Paired differences against {html.escape(base.name)}</h2>",
                 "<p>Over the seeds a row shares with the baseline: row − baseline in points, mean [95 % t "
                 "interval], paired t-test p-value.</p>",
                 _table(["Run", "Shared seeds"] + [t for t, _ in paired_columns],
                        [[g.name, ", ".join(map(str, shared))] + [paired_cell(stats[t]) for t, _ in paired_columns]
                         for g, shared, stats in paired_rows(groups, base, paired_columns)])]
    more_header, more_table = more_rows(groups, [t for t, _ in columns[1:4]])
    if more_table:
        body += ["<h2>MORE's diagnostics</h2>",
                 "<p>At the last tracked epoch, over the seeds that logged them: the per-class discrepancy averaged "
                 "over each class group, the low-rank share ||s B A|| / ||W_g|| of the median and largest layer.</p>",
                 _table(more_header, more_table)]
    body.append("<h2>Per-class accuracy against class size</h2>")
    for g in groups:
        caption = f"{g.name} (seeds {', '.join(map(str, g.seeds()))}): Many blue, Medium orange, Few red"
        body.append(f"<figure>{per_class_svg(g)}<figcaption>{html.escape(caption)}</figcaption></figure>")
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{_STYLE}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")
