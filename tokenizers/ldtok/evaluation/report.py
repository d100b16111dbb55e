"""Write an `EvalResult` to disk: `report.json` (every number), a self-contained `report.html`, the per-image CSV and
the pictures as PNGs. Every file is written atomically (a temporary file, then a rename).

`report.html` embeds its images as base64 PNG data URIs (it can be mailed or attached alone); each metric row carries
`data-key` (the metric's name, e.g. `val/psnr`) and its value cell `data-value` (the exact float as JSON writes it), so
the page can be checked against `report.json` by a program.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import math
import os
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ..atomic import write_text_atomic
from ..images import save_image_atomic
from ..metrics import PSNR_CAP
from ..metrics.colour import CHROMA_BIN_WIDTH
from .result import EvalResult

CSV_NAME = "per_image.csv"
JSON_NAME = "report.json"
HTML_NAME = "report.html"
HTML_WORST = 10  # rows of the per-image table shown in the HTML (all are in the CSV)
STYLE = (
    "<style>body{font-family:sans-serif;margin:2em;max-width:1200px}table{border-collapse:collapse;margin:1em 0}"
    "td,th{border:1px solid #ccc;padding:4px 8px;text-align:left;vertical-align:top}td.value{font-family:"
    "monospace;text-align:right}img{image-rendering:pixelated;max-width:100%}figure{margin:1em 0}</style>"
)


def _finite_or_none(v: Any) -> Any:
    """JSON has no infinity or NaN: `+inf` (PSNR of an exact reconstruction), NaN or `-inf` become `null`, in nested
    dicts, lists and tuples too (what `report.json` holds must parse everywhere: `allow_nan=False`)."""
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, dict):
        return {k: _finite_or_none(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_finite_or_none(x) for x in v]
    return v


def environment() -> dict[str, str]:
    """Versions and the date, as the report records them."""
    import diffusers
    import torch

    import ldtok

    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "ldtok": ldtok.__version__,
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
    }


def report_dict(result: EvalResult, *, model: dict[str, Any], dataset: dict[str, Any], files: dict[str, str]) -> dict:
    """The content of `report.json` (see `write_report`)."""
    return _finite_or_none({
        **environment(),
        "model": model,
        "dataset": dataset,
        "num_images": result.num_images,
        "num_processes": result.num_processes,
        "skipped": result.skipped,
        "psnr_cap": PSNR_CAP,
        "metrics": {m.key: m.value for m in result.metrics if m.value is not None},  # NaN / inf: null
        "not_run": {m.key: m.detail.removeprefix("not run: ") for m in result.metrics if m.value is None},
        "metric_details": [asdict(m) for m in result.metrics],
        "feature_net": result.feature_net,
        "kl_per_channel": result.kl_per_channel,
        "collapsed_channels": result.collapsed_channels,
        "codebook": result.codebook,
        "chroma_histogram": None if result.chroma_histogram is None else {
            "bin_width": CHROMA_BIN_WIDTH, "last_bin_open": True,
            "originals": result.chroma_histogram[0], "reconstructions": result.chroma_histogram[1],
        },
        "duplicates_dropped": result.duplicates,
        "pictures": {name: {"file": files[name], "caption": p.caption} for name, p in result.pictures.items()},
        "per_image_csv": files["per_image"],
        "per_image_sorted_by": "mse, highest first (ties by id); psnr null = exact reconstruction (+inf)",
        "per_image": result.per_image,
    })


def write_per_image_csv(rows: list[dict[str, Any]], path: str | os.PathLike) -> Path:
    """One row per image, in the given order (`EvalResult.per_image`: highest MSE first); PSNR `inf` as `inf`."""
    buf = io.StringIO()
    fields = list(rows[0]) if rows else ["id", "mse", "psnr", "ssim"]
    writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: repr(v) if isinstance(v, float) else v for k, v in row.items()})
    write_text_atomic(path, buf.getvalue())
    return Path(path)


def write_report(
    result: EvalResult, out_dir: str | os.PathLike, *, model: dict[str, Any], dataset: dict[str, Any]
) -> dict[str, Path]:
    """Write `report.json`, `report.html`, `per_image.csv` and one PNG per picture into `out_dir`.

    Args:
        result (`EvalResult`): from `evaluate_tokenizer` (on the main process: it holds the pictures).
        out_dir (`str` or `PathLike`): created if missing; existing files of the same names are replaced.
        model (`dict`): what was evaluated, e.g. `{"path": ..., "kind": ..., "config_sha256": ...}`.
        dataset (`dict`): where the images came from (e.g. the `DataConfig` as a dict).

    Returns:
        `dict` name -> path of every file written.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"per_image": write_per_image_csv(result.per_image, out / CSV_NAME)}
    pngs = {}
    for name, picture in result.pictures.items():
        paths[name] = save_image_atomic(picture.image, out / f"{name}.png")
        pngs[name] = paths[name].read_bytes()
    files = {name: p.name for name, p in paths.items()}
    report = report_dict(result, model=model, dataset=dataset, files=files)
    paths["json"] = out / JSON_NAME
    write_text_atomic(paths["json"], json.dumps(report, indent=2, allow_nan=False) + "\n")
    paths["html"] = out / HTML_NAME
    write_text_atomic(paths["html"], render_html(report, result, pngs))
    return paths


def _fmt(v: float) -> str:
    if v == 0 or 1e-3 <= abs(v) < 1e5:
        return f"{v:.4f}"
    return f"{v:.4g}"


def render_html(report: dict, result: EvalResult, pngs: dict[str, bytes]) -> str:
    """A self-contained HTML page: header facts, the metric table, latent statistics, pictures, worst images."""
    e = html.escape
    model, data = report["model"], report["dataset"]
    facts = [
        ("model", model.get("path")), ("kind", model.get("kind")), ("config sha256", model.get("config_sha256")),
        ("dataset", ", ".join(f"{k}={v}" for k, v in data.items() if v is not None)),
        ("images", f"{report['num_images']} evaluated, {len(report['skipped'])} undecodable skipped"),
        ("processes", report["num_processes"]), ("date", report["date"]),
        ("versions", f"ldtok {report['ldtok']}, torch {report['torch']}, diffusers {report['diffusers']}"),
    ]
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        f"<title>ldtok eval: {e(str(model.get('path')))}</title>",
        STYLE,
        "</head><body>", "<h1>Tokenizer evaluation</h1>", '<table class="facts">',
    ]
    parts += [f"<tr><th>{e(k)}</th><td>{e(str(v))}</td></tr>" for k, v in facts]
    parts += ["</table>", "<h2>Metrics</h2>", '<table class="metrics">',
              "<tr><th>metric</th><th>key</th><th>value</th><th>how it was measured</th></tr>"]
    for m in result.metrics:
        if m.value is None:
            cell = '<td class="value not-run">not run</td>'
        else:
            cell = f'<td class="value" data-value="{json.dumps(_finite_or_none(m.value))}">{e(_fmt(m.value))}</td>'
        parts.append(f'<tr data-key="{e(m.key)}"><td>{e(m.label)}</td><td>{e(m.key)}</td>{cell}'
                     f"<td>{e(m.detail)}</td></tr>")
    parts.append("</table>")
    if result.kl_per_channel is not None:
        parts += ["<h2>KL per latent channel</h2>",
                  '<table class="kl"><tr><th>channel</th><th>KL (nats per image)</th><th>collapsed</th></tr>']
        for c, v in enumerate(result.kl_per_channel):
            flag = "yes" if c in (result.collapsed_channels or []) else ""
            value = json.dumps(_finite_or_none(v))
            parts.append(f'<tr><td>{c}</td><td class="value" data-value="{value}">{e(_fmt(v))}</td>'
                         f"<td>{flag}</td></tr>")
        parts.append("</table>")
    if result.codebook:
        head = "".join(f"<th>{c}</th>" for c in ("level", "codes", "used", "usage", "perplexity", "entropy (nats)",
                                                  "indices counted"))
        parts += ["<h2>Codebook</h2>", f'<table class="codebook"><tr>{head}</tr>']
        for level, s in result.codebook.items():
            parts.append(f"<tr><td>{e(level)}</td><td>{int(s['num_codes'])}</td><td>{int(s['used'])}</td>"
                         f"<td>{s['usage']:.4f}</td><td>{s['perplexity']:.2f}</td><td>{s['entropy']:.4f}</td>"
                         f"<td>{int(s['total'])}</td></tr>")
        parts.append("</table>")
    for name, picture in result.pictures.items():
        uri = "data:image/png;base64," + base64.b64encode(pngs[name]).decode("ascii")
        title = name.replace("_", " ").capitalize()
        parts += [f"<h2>{e(title)}</h2>", f'<figure><img alt="{e(name)}" src="{uri}">',
                  f"<figcaption>{e(picture.caption)}</figcaption></figure>"]
    rows = result.per_image[:HTML_WORST]
    if rows:
        cols = list(rows[0])
        title = f"Highest reconstruction error (MSE; all {report['num_images']} in {report['per_image_csv']})"
        head = "".join(f"<th>{e(c)}</th>" for c in cols)
        parts += [f"<h2>{e(title)}</h2>", f'<table class="worst"><tr>{head}</tr>']
        for row in rows:
            cells = "".join(f"<td>{e(_fmt(v) if isinstance(v, float) else '' if v is None else str(v))}</td>"
                            for v in row.values())
            parts.append(f"<tr>{cells}</tr>")
        parts.append("</table>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"
