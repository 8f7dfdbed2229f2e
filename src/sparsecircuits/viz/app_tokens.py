"""Token heatmaps as HTML: each token a span whose background shows a value (the dashboard's
snippets and task prompts). Text is escaped; newlines show as ``↵`` and break the line."""

from __future__ import annotations

import html
from collections.abc import Sequence

POS_RGB = (33, 102, 172)  # blue: positive activation (as the export-html page)
NEG_RGB = (178, 24, 43)  # red: negative activation
SEQ_RGB = (0, 109, 44)  # green: the min-max (not zero-centred) scale
MAX_ALPHA = 0.85

STYLE = (
    "font-family: ui-monospace, 'DejaVu Sans Mono', monospace; font-size: 13px; "
    "white-space: pre-wrap; line-height: 1.7; word-break: break-all"
)


def show_token(token: str) -> str:
    """Escaped HTML for a token's text, whitespace made visible."""
    text = html.escape(token).replace("\t", "⇥   ")
    return text.replace("\r", "").replace("\n", "↵\n")


def color(value: float, *, scale: float, zero_centered: bool = True, low: float = 0.0) -> str:
    """Background of one token: diverging (blue > 0, red < 0, |value| / scale) when
    ``zero_centered``, else green by (value - low) / scale."""
    if scale <= 0:
        return "transparent"
    if zero_centered:
        frac, rgb = min(abs(value) / scale, 1.0), POS_RGB if value >= 0 else NEG_RGB
    else:
        frac, rgb = min(max((value - low) / scale, 0.0), 1.0), SEQ_RGB
    return f"rgba({rgb[0]},{rgb[1]},{rgb[2]},{frac * MAX_ALPHA:.3f})"


def token_spans(
    tokens: Sequence[str],
    values: Sequence[float],
    *,
    scale: float,
    zero_centered: bool = True,
    low: float = 0.0,
    focus: int | None = None,
) -> str:
    """The tokens as coloured spans (hover shows each value); ``focus`` is outlined."""
    out = []
    for i, (tok, v) in enumerate(zip(tokens, values, strict=True)):
        style = f"background:{color(v, scale=scale, zero_centered=zero_centered, low=low)}"
        if i == focus:
            style += ";outline:2px solid #222;outline-offset:-1px"
        title = html.escape(f"{tok!r}: {v:.4g}", quote=True)
        out.append(f'<span title="{title}" style="{style}">{show_token(tok)}</span>')
    return "".join(out)


def token_block(lines: Sequence[tuple[str, str]]) -> str:
    """Several token lines, each with a caption: [(caption, spans html)] -> one HTML block."""
    rows = "".join(
        f'<div style="margin:2px 0 8px 0"><div style="color:#555;font-size:12px">'
        f'{html.escape(caption)}</div><div style="{STYLE}">{spans}</div></div>'
        for caption, spans in lines
    )
    return f'<div class="sc-tokens">{rows}</div>'


def legend_html(*, scale: float, zero_centered: bool = True, low: float = 0.0) -> str:
    """A colour key for token heatmaps."""
    if zero_centered:
        neg, pos = color(-scale, scale=scale), color(scale, scale=scale)
        stops = f"{neg}, rgba(255,255,255,0), {pos}"
        left, mid, right = f"{-scale:.3g}", "0", f"{scale:.3g}"
        what = "activation (red < 0 < blue)"
    else:
        stops = (
            f"rgba(255,255,255,0), {color(low + scale, scale=scale, zero_centered=False, low=low)}"
        )
        left, mid, right = f"{low:.3g}", "", f"{low + scale:.3g}"
        what = "activation (min to max)"
    bar = (
        f'<span style="display:inline-block;width:160px;height:12px;vertical-align:middle;'
        f'border:1px solid #ccc;background:linear-gradient(to right, {stops})"></span>'
    )
    return (
        f'<div style="font-size:12px;color:#444;margin:4px 0">{html.escape(what)}: '
        f"{left} {bar} {right}"
        f"{' (white = ' + mid + ')' if mid else ''}; outlined = focus token</div>"
    )


def difference(
    tokens_a: Sequence[str],
    acts_a: Sequence[float],
    tokens_b: Sequence[str],
    acts_b: Sequence[float],
) -> tuple[list[str], list[float]]:
    """B minus A per token, the prompts aligned at their last token (the answer position); a
    token that differs shows as ``a|b``."""
    n = min(len(tokens_a), len(tokens_b))
    ta, tb = list(tokens_a)[len(tokens_a) - n :], list(tokens_b)[len(tokens_b) - n :]
    va, vb = list(acts_a)[len(acts_a) - n :], list(acts_b)[len(acts_b) - n :]
    tokens = [b if a == b else f"{a}|{b}" for a, b in zip(ta, tb, strict=True)]
    return tokens, [y - x for x, y in zip(va, vb, strict=True)]


def swatch(kind: str, color: str) -> str:
    """A small legend mark: ``line``, ``dotted``, ``box``, ``ring`` or ``gradient`` (color is
    then a CSS gradient's colour stops)."""
    base = "display:inline-block;vertical-align:middle;margin:0 4px 0 10px;"
    if kind == "line":
        return f'<span style="{base}width:22px;border-top:3px solid {color}"></span>'
    if kind == "dotted":
        return f'<span style="{base}width:22px;border-top:2px dotted {color}"></span>'
    if kind == "ring":
        return (
            f'<span style="{base}width:10px;height:10px;border-radius:50%;'
            f'border:2px solid {color}"></span>'
        )
    if kind == "gradient":
        return (
            f'<span style="{base}width:60px;height:10px;border:1px solid #ccc;'
            f'background:linear-gradient(to right, {color})"></span>'
        )
    return f'<span style="{base}width:12px;height:12px;background:{color}"></span>'


def legend_row(items: Sequence[tuple[str, str, str]]) -> str:
    """One line of legend entries [(kind, color, label)] (labels are escaped)."""
    parts = "".join(
        f'<span style="white-space:nowrap">{swatch(k, c)}{html.escape(label)}</span> '
        for k, c, label in items
    )
    return f'<div style="font-size:13px;color:#333;margin:2px 0">{parts}</div>'


_TABLE_STYLE = (
    "<style>.sc-table{border-collapse:collapse;font-size:14px;width:100%}"
    ".sc-table th,.sc-table td{border:1px solid #ddd;padding:4px 8px;text-align:left;"
    "vertical-align:top}.sc-table th{background:#f6f6f6;position:sticky;top:0}"
    ".sc-table td.num{text-align:right;font-variant-numeric:tabular-nums}</style>"
)


def table_html(
    head: Sequence[str],
    rows: Sequence[Sequence[str]],
    *,
    numeric: Sequence[int] = (),
    max_height: int | None = None,
) -> str:
    """A plain HTML table (cells already escaped HTML); ``numeric`` columns align right.
    Cheaper for the browser than a data-grid component (the inspector redraws on every click)."""
    th = "".join(f"<th>{html.escape(c)}</th>" for c in head)
    body = "".join(
        "<tr>"
        + "".join(
            f'<td class="num">{c}</td>' if i in numeric else f"<td>{c}</td>"
            for i, c in enumerate(row)
        )
        + "</tr>"
        for row in rows
    )
    table = f'<table class="sc-table"><tr>{th}</tr>{body}</table>'
    if max_height is not None:
        table = f'<div style="max-height:{max_height}px;overflow-y:auto">{table}</div>'
    return _TABLE_STYLE + table


def report_html(rows: Sequence[dict[str, str]]) -> str:
    """The verification checks as a wrapping HTML table, PASS green and FAIL red."""
    cells = []
    for r in rows:
        colour = "#1a7f37" if r["result"] == "PASS" else "#cf222e"
        verdict = f'<b style="color:{colour}">{html.escape(r["result"])}</b>'
        cells.append(
            [
                html.escape(r["check"]),
                verdict,
                html.escape(r["criterion"]),
                html.escape(r["summary"]),
            ]
        )
    return table_html(["check", "result", "criterion", "summary"], cells)
