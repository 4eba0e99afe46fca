"""Markup of the report: one self-contained HTML page (inline CSS, images as data: URIs,
system fonts only), so it opens offline and survives being mailed as one file."""

from __future__ import annotations

import base64
from html import escape

from pneumoscope.evaluation.metrics import CI_METRICS

METRIC_NAMES = {
    "accuracy": "Accuracy",
    "sensitivity": "Sensitivity (recall)",
    "specificity": "Specificity",
    "precision": "Precision (PPV)",
    "f1": "F1",
    "roc_auc": "ROC AUC",
    "pr_auc": "PR AUC (average precision)",
}

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif;
 margin:0;background:#f5f6f8;color:#1d2330;line-height:1.45}
header{background:#1d2330;color:#fff;padding:18px 32px}
header h1{margin:0 0 4px;font-size:22px}header p{margin:0;color:#c9cfdb;font-size:14px}
header code{background:#2e3648;color:#e8ecf3}
nav{padding:8px 32px;background:#fff;border-bottom:1px solid #dde1e8;font-size:14px;position:sticky;top:0}
nav a{margin-right:14px;color:#0b5cad;text-decoration:none}
main{max-width:1240px;margin:0 auto;padding:8px 24px 40px}
section{background:#fff;border:1px solid #dde1e8;border-radius:8px;margin:18px 0;padding:14px 22px}
h2{font-size:18px;margin:4px 0 10px}p.note{color:#4b5466;font-size:13.5px;margin:6px 0}
table{border-collapse:collapse;font-size:14px;margin:6px 0}
th,td{padding:5px 12px;border-bottom:1px solid #e6e9ef;text-align:left}
th{background:#f0f2f6}td.num{text-align:right;font-variant-numeric:tabular-nums}
.grid{display:grid;grid-template-columns:repeat(auto-fit,minmax(330px,1fr));gap:18px;align-items:start}
figure{margin:6px 0}figure img{max-width:100%;height:auto;border:1px solid #eceff3}
figcaption{font-size:13px;color:#4b5466;max-width:640px}h3{font-size:15px;margin:8px 0 4px}
.kv td:first-child{color:#4b5466;white-space:nowrap}
code{background:#f0f2f6;padding:1px 4px;border-radius:3px;font-size:12.5px}
footer{color:#6b7385;font-size:12.5px;text-align:center;padding:10px}
"""


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def figure(png: bytes, alt: str, caption: str, file_name: str, anchor: str = "") -> str:
    ident = f' id="{anchor}"' if anchor else ""
    return (
        f'<figure{ident}><img src="{data_uri(png)}" alt="{escape(alt)}">'
        f"<figcaption>{caption} <code>{escape(file_name)}</code></figcaption></figure>"
    )


def metrics_table(metrics: dict) -> str:
    """The evaluate table (point estimate and patient-bootstrap 95% CI) as HTML."""
    ci = metrics.get("ci95", {})
    rows = []
    for key in CI_METRICS:
        lo_hi = ci.get(key)
        span = f"{lo_hi[0]:.3f} – {lo_hi[1]:.3f}" if lo_hi else "–"
        rows.append(
            f"<tr><td>{METRIC_NAMES[key]}</td><td class=num>{metrics[key]:.3f}</td>"
            f"<td class=num>{span}</td></tr>"
        )
    c = metrics["confusion"]
    rows.append(
        f"<tr><td>Confusion</td><td colspan=2>TP {c['tp']} · FP {c['fp']} · "
        f"TN {c['tn']} · FN {c['fn']}</td></tr>"
    )
    return (
        "<table><tr><th>Metric</th><th>Value</th><th>95% CI</th></tr>" + "".join(rows) + "</table>"
    )


def key_values(pairs: list[tuple[str, str]]) -> str:
    """A two-column table; values are HTML (escape them before)."""
    return (
        "<table class=kv>"
        + "".join(f"<tr><td>{escape(k)}</td><td>{v}</td></tr>" for k, v in pairs)
        + "</table>"
    )


def counts_table(rows: list[tuple[str, dict]], classes: tuple[str, ...]) -> str:
    """Images per class for several sets: [(name, {class: n, ...}), ...]."""
    head = "".join(f"<th>{escape(c)}</th>" for c in classes)
    body = []
    for name, counts in rows:
        cells = "".join(f"<td class=num>{counts.get(c, 0)}</td>" for c in classes)
        total = sum(counts.get(c, 0) for c in classes)
        body.append(f"<tr><td>{escape(name)}</td>{cells}<td class=num>{total}</td></tr>")
    return f"<table><tr><th>Set</th>{head}<th>Total</th></tr>{''.join(body)}</table>"


def section(anchor: str, title: str, body: str) -> str:
    return f'<section id="{anchor}"><h2>{escape(title)}</h2>{body}</section>'


def grid(*items: str) -> str:
    return "<div class=grid>" + "".join(f"<div>{item}</div>" for item in items) + "</div>"


def page(
    title: str,
    subtitle: str,
    sections: list[tuple[str, str, str]],
    footer: str,
    nav: list[tuple[str, str]],
) -> str:
    """sections: (anchor, title, body html); nav: (anchor, label) links of the sticky bar."""
    nav = "".join(f'<a href="#{a}">{escape(t)}</a>' for a, t in nav)
    body = "".join(section(a, t, b) for a, t, b in sections)
    return (
        "<!DOCTYPE html>\n<html lang=en><head><meta charset=utf-8>"
        '<meta name=viewport content="width=device-width,initial-scale=1">'
        # No network for anything: forbid it outright, so a stray URL cannot leak a request.
        "<meta http-equiv=Content-Security-Policy content=\"default-src 'none'; "
        "img-src data:; style-src 'unsafe-inline'\">"
        f"<title>{escape(title)}</title><style>{CSS}</style></head><body>"
        f"<header><h1>{escape(title)}</h1><p>{subtitle}</p></header><nav>{nav}</nav>"
        f"<main>{body}</main><footer>{footer}</footer></body></html>\n"
    )


def drift_table(drift: dict) -> str:
    """The drift numbers (pneumoscope drift's console table) as HTML."""
    v, f = drift["scores"]["validation"], drift["scores"]["folder"]
    rows = [("Images", f"{v['n']}", f"{f['n']}")]
    rows += [
        (
            f"p(pneumonia) {key[1:]}th percentile",
            f"{v['quantiles'][key]:.3f}",
            f"{f['quantiles'][key]:.3f}",
        )
        for key in ("q05", "q25", "q50", "q75", "q95")
    ]
    rows.append(
        (
            f"Predicted positive (threshold {drift['threshold']:.3f})",
            f"{v['share_positive']:.1%}",
            f"{f['share_positive']:.1%}",
        )
    )
    body = "".join(
        f"<tr><td>{escape(a)}</td><td class=num>{b}</td><td class=num>{c}</td></tr>"
        for a, b, c in rows
    )
    o = drift["outside"]
    return (
        f"<p><b>Domain AUC {drift['domain_auc']:.3f}</b>: {escape(drift['verdict'])}.</p>"
        "<table><tr><th></th><th>Validation</th><th>Folder</th></tr>" + body + "</table>"
        f"<p class=note>Outside validation: {o['embedding']:.1%} of the folder by embedding distance "
        f"({escape(o['embedding_definition'])}), {o['score']:.1%} by score "
        f"({escape(o['score_definition'])}).</p>"
    )
