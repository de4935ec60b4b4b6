"""Evaluation outputs: per-image CSV, JSON summary, PNG charts (matplotlib, Agg) and a self-contained HTML report.

A *record* is one scored image::

    {"model": "A", "key": "00003_s0", "prompt_idx": 3, "seed": 0, "prompt": "...", "image": "images/A/00003_s0.png",
     "pickscore": 21.3, "clip": 30.1, ...}

Records of different models with the same ``key`` (same prompt, same seed) are paired for win rates.

Files written by :func:`write_report` into ``out``:

* ``scores.csv`` -- one row per record.
* ``summary.json`` -- ``{"meta", "metrics": {metric: {model: Summary}}, "win_rates": {metric: WinRate}}`` (+
  ``pickscore_preference``: mean PickScore preference probability of A over B, when PickScore was run).
* ``charts/means.png`` (mean and 95% CI per metric and model), ``charts/hist_<metric>.png``,
  ``charts/win_rates.png`` (two models only).
* ``report.html`` -- tables, the charts and an image grid, self-contained: the charts and the images (downscaled
  to at most :data:`THUMB_SIZE` px on the long side) are embedded as ``data:image/png;base64,`` URIs, so the file
  can be moved, mailed or attached on its own.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .stats import summarize, win_rate_summary

BASE_COLUMNS = ["model", "key", "prompt_idx", "seed", "prompt", "image"]
THUMB_SIZE = 256  # px, long side of the images embedded in report.html


def metric_values(records: Sequence[dict], model: str, metric: str) -> dict[str, float]:
    """``{key: score}`` of one model and metric."""
    return {r["key"]: float(r[metric]) for r in records if r["model"] == model and metric in r}


def build_summary(
    records: Sequence[dict],
    models: Sequence[str],
    metrics: Sequence[str],
    *,
    n_boot: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
    extra: dict | None = None,
) -> dict:
    """Per metric and model: :class:`~diffalign.evaluators.stats.Summary`; for exactly two models: the paired win
    rate of the first over the second per metric (ties count half)."""
    summary: dict = {"metrics": {}, "win_rates": {}}
    for metric in metrics:
        summary["metrics"][metric] = {
            model: summarize(
                list(metric_values(records, model, metric).values()),
                n_boot=n_boot,
                confidence=confidence,
                seed=seed,
            ).to_dict()
            for model in models
            if metric_values(records, model, metric)
        }
    if len(models) == 2:
        a_name, b_name = models
        summary["win_rates"]["_pair"] = f"{a_name} vs {b_name}"
        for metric in metrics:
            a, b = metric_values(records, a_name, metric), metric_values(records, b_name, metric)
            keys = sorted(set(a) & set(b))
            if keys:
                summary["win_rates"][metric] = win_rate_summary(
                    [a[k] for k in keys],
                    [b[k] for k in keys],
                    n_boot=n_boot,
                    confidence=confidence,
                    seed=seed,
                ).to_dict()
    if extra:
        summary.update(extra)
    return summary


def write_csv(path: Path, records: Sequence[dict], metrics: Sequence[str]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=BASE_COLUMNS + list(metrics), extrasaction="ignore")
        writer.writeheader()
        for r in records:
            writer.writerow(r)


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


COLORS = ["#4C72B0", "#DD8452", "#55A868", "#C44E52", "#8172B3", "#937860"]


def plot_means(path: Path, summary: dict, models: Sequence[str], metrics: Sequence[str]) -> None:
    """One panel per metric (scales differ): a dot at the mean, whiskers at the bootstrap CI. Dots rather than bars:
    several metrics are negative or live far from 0 (HPS cosines, ImageReward z-scores)."""
    plt = _plt()
    n = len(metrics)
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.2 * rows), squeeze=False)
    for ax, metric in zip(axes.flat, metrics):
        stats = summary["metrics"][metric]
        names = [m for m in models if m in stats]
        for i, m in enumerate(names):
            s = stats[m]
            err = [[s["mean"] - s["ci_low"]], [s["ci_high"] - s["mean"]]]
            ax.errorbar(
                [i], [s["mean"]], yerr=err, fmt="o", markersize=8, capsize=8, color=COLORS[i % len(COLORS)]
            )
        ax.set_xticks(range(len(names)), [f"{m}\n{stats[m]['mean']:.4g}" for m in names])
        ax.set_xlim(-0.6, len(names) - 0.4)
        ax.set_title(metric)
        ax.grid(axis="y", alpha=0.3)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.suptitle("mean per metric and model (whiskers: 95% bootstrap CI)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_histogram(path: Path, records: Sequence[dict], models: Sequence[str], metric: str) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 3.2))
    values = {m: list(metric_values(records, m, metric).values()) for m in models}
    allv = [v for vs in values.values() for v in vs]
    bins = np.histogram_bin_edges(allv, bins=min(30, max(5, len(allv) // 2))) if allv else 10
    for color, (model, vs) in zip(COLORS, values.items()):
        if vs:
            ax.hist(vs, bins=bins, alpha=0.55, label=model, color=color)
    ax.set_title(f"{metric}: per-image scores")
    ax.set_xlabel(metric)
    ax.set_ylabel("images")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_win_rates(path: Path, summary: dict, metrics: Sequence[str]) -> None:
    plt = _plt()
    rates = summary["win_rates"]
    names = [m for m in metrics if m in rates]
    fig, ax = plt.subplots(figsize=(max(4, 1.2 * len(names) + 2), 3.2))
    vals = np.array([rates[m]["rate"] for m in names])
    err = np.array(
        [
            [rates[m]["rate"] - rates[m]["ci_low"] for m in names],
            [rates[m]["ci_high"] - rates[m]["rate"] for m in names],
        ]
    )
    ax.bar(range(len(names)), vals, yerr=err, capsize=6, color=COLORS[0])
    ax.axhline(0.5, color="gray", linestyle="--", linewidth=1)
    ax.set_xticks(range(len(names)), names)
    ax.set_ylim(0, 1)
    ax.set_ylabel("win rate")
    ax.set_title(f"win rate {rates.get('_pair', '')} (ties = 1/2, 95% CI)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#222}
table{border-collapse:collapse;margin:8px 0 20px}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}
th{background:#f3f3f3}td.l,th.l{text-align:left}
.grid{display:grid;grid-template-columns:repeat(var(--cols),256px);gap:10px}
.charts{display:flex;flex-wrap:wrap;gap:8px;align-items:flex-start}
.cell{border:1px solid #ddd;padding:6px;font-size:12px}.cell img{width:100%;image-rendering:pixelated;display:block}
.prompt{font-size:12px;color:#444;margin:10px 0 2px;grid-column:1/-1}
img.chart{max-width:100%;border:1px solid #eee;margin:6px 0}
.muted{color:#777;font-size:12px}
"""


def _fmt(x: float) -> str:
    return f"{x:.4g}"


def png_data_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def image_data_uri(path: Path, max_size: int = THUMB_SIZE) -> str | None:
    """``path`` as an embeddable PNG data URI, downscaled (aspect kept) to at most ``max_size`` px on the long side;
    ``None`` when the file cannot be read."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            alpha = im.mode in ("RGBA", "LA") or (im.mode == "P" and "transparency" in im.info)
            im = im.convert("RGBA" if alpha else "RGB")
            if max(im.size) > max_size:
                im.thumbnail((max_size, max_size), Image.Resampling.LANCZOS)
            buf = io.BytesIO()
            im.save(buf, format="PNG", optimize=True)
    except OSError:
        return None
    return png_data_uri(buf.getvalue())


def write_html(
    path: Path,
    records: Sequence[dict],
    summary: dict,
    models: Sequence[str],
    metrics: Sequence[str],
    charts: dict,
    max_rows: int = 24,
) -> None:
    """The report: meta, summary table, win-rate table, charts, and an image grid (one row per prompt/seed key,
    one column per model) captioned with every metric.

    Self-contained: ``charts`` (``{title: path}``) and ``records[i]["image"]`` are paths relative to ``path``'s
    folder (or absolute); both are read and embedded as PNG data URIs (images downscaled to :data:`THUMB_SIZE`)."""
    base = Path(path).parent
    e = html.escape
    meta = summary.get("meta", {})
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>diffalign eval</title><style>{_CSS}</style></head><body>"
    ]
    parts.append("<h1>diffalign eval report</h1>")

    def show(v) -> str:
        if isinstance(v, dict):
            return ", ".join(f"{k} = {x}" for k, x in v.items())
        if isinstance(v, (list, tuple)):
            return ", ".join(map(str, v))
        return str(v)

    parts.append(
        "<table>"
        + "".join(
            f"<tr><th class='l'>{e(str(k))}</th><td class='l'>{e(show(v))}</td></tr>"
            for k, v in meta.items()
            if v is not None
        )
        + "</table>"
    )

    parts.append(
        "<h2>Summary</h2><table><tr><th class='l'>metric</th><th class='l'>model</th><th>mean</th><th>std</th><th>95% CI</th><th>n</th></tr>"
    )
    for metric in metrics:
        for model, s in summary["metrics"].get(metric, {}).items():
            parts.append(
                f"<tr><td class='l'>{e(metric)}</td><td class='l'>{e(model)}</td><td>{_fmt(s['mean'])}</td><td>{_fmt(s['std'])}</td>"
                f"<td>[{_fmt(s['ci_low'])}, {_fmt(s['ci_high'])}]</td><td>{s['n']}</td></tr>"
            )
    parts.append("</table>")

    rates = summary.get("win_rates", {})
    if any(m in rates for m in metrics):
        parts.append(
            f"<h2>Win rate: {e(rates.get('_pair', ''))}</h2><table><tr><th class='l'>metric</th><th>win rate</th><th>95% CI</th><th>wins</th><th>ties</th><th>losses</th></tr>"
        )
        for metric in metrics:
            if metric in rates:
                w = rates[metric]
                parts.append(
                    f"<tr><td class='l'>{e(metric)}</td><td>{w['rate']:.3f}</td><td>[{w['ci_low']:.3f}, {w['ci_high']:.3f}]</td>"
                    f"<td>{w['wins']}</td><td>{w['ties']}</td><td>{w['losses']}</td></tr>"
                )
        parts.append("</table>")
        if "pickscore_preference" in summary:
            parts.append(
                f"<p>Mean PickScore preference probability P({e(models[0])} &gt; {e(models[1])}): {summary['pickscore_preference']:.3f}</p>"
            )

    parts.append("<h2>Charts</h2><div class='charts'>")
    for title, rel in charts.items():
        try:
            uri = png_data_uri((base / rel).read_bytes())
        except OSError:
            parts.append(f"<p class='muted'>chart {e(title)} unavailable</p>")
            continue
        parts.append(f"<img class='chart' alt='{e(title)}' src='{uri}'>")
    parts.append("</div>")

    parts.append(
        f"<h2>Images</h2><p class='muted'>first {max_rows} prompt/seed keys; columns: {e(', '.join(models))}</p>"
    )
    by_key: dict[str, dict[str, dict]] = {}
    for r in records:
        by_key.setdefault(r["key"], {})[r["model"]] = r
    parts.append(f"<div class='grid' style='--cols:{max(1, len(models))}'>")
    for key in sorted(by_key)[:max_rows]:
        row = by_key[key]
        first = next(iter(row.values()))
        parts.append(f"<div class='prompt'><b>{e(key)}</b> — {e(first['prompt'])}</div>")
        for model in models:
            r = row.get(model)
            if r is None:
                parts.append("<div class='cell'>—</div>")
                continue
            caption = "<br>".join(f"{e(m)}: {_fmt(float(r[m]))}" for m in metrics if m in r)
            uri = image_data_uri(base / r["image"])
            picture = (
                f"<img src='{uri}' alt='{e(model)} {e(key)}'>"
                if uri
                else f"<p class='muted'>image {e(str(r['image']))} unavailable</p>"
            )
            parts.append(f"<div class='cell'>{picture}<b>{e(model)}</b><br>{caption}</div>")
    parts.append("</div></body></html>")
    path.write_text("\n".join(parts), encoding="utf-8")


def write_report(
    out: Path,
    records: Sequence[dict],
    models: Sequence[str],
    metrics: Sequence[str],
    *,
    meta: dict | None = None,
    extra: dict | None = None,
    n_boot: int = 1000,
) -> dict:
    """Write scores.csv, summary.json, charts/*.png and report.html into ``out``; return the summary dict.

    Image paths in ``records`` are relative to ``out`` (or absolute); ``report.html`` embeds the images and charts,
    so it stays complete when moved.
    """
    out = Path(out)
    (out / "charts").mkdir(parents=True, exist_ok=True)
    summary = build_summary(records, models, metrics, n_boot=n_boot, extra=extra)
    summary = {"meta": dict(meta or {}), **summary}
    write_csv(out / "scores.csv", records, metrics)
    (out / "summary.json").write_text(
        json.dumps(summary, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )

    charts = {}
    if metrics:
        plot_means(out / "charts" / "means.png", summary, models, metrics)
        charts["means"] = "charts/means.png"
    if any(m in summary["win_rates"] for m in metrics):
        plot_win_rates(out / "charts" / "win_rates.png", summary, metrics)
        charts["win rates"] = "charts/win_rates.png"
    for metric in metrics:
        name = f"hist_{metric.replace('.', '_')}.png"
        plot_histogram(out / "charts" / name, records, models, metric)
        charts[f"histogram {metric}"] = f"charts/{name}"
    write_html(out / "report.html", records, summary, models, metrics, charts)
    return summary
