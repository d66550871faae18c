"""Self-contained HTML comparison report (tables, image grid, energy plot), logged to MLflow."""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

from lbm_registry.settings import WorkspaceSettings


def energy_plot(layers_a: Any, layers_b: Any, dest: Path, labels: tuple[str, str] = ("A", "B")) -> Path:
    """Energy captured vs rank, averaged per layer group, for both LoRAs (from their spectra)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    from lbm_registry.lora.similarity import layer_group, spectrum

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, lora, label in zip(axes, (layers_a, layers_b), labels, strict=True):
        groups: dict[str, list[torch.Tensor]] = {}
        for m, layer in lora.layers.items():
            s2 = spectrum(layer) ** 2
            total = float(s2.sum())
            if total > 0:
                groups.setdefault(layer_group(m), []).append(torch.cumsum(s2, 0) / total)
        top = sorted(groups, key=lambda g: -len(groups[g]))[:8]
        for g in top:
            curves = groups[g]
            n = max(len(c) for c in curves)
            padded = torch.stack([torch.cat([c, c[-1:].expand(n - len(c))]) for c in curves])
            ax.plot(range(1, n + 1), padded.mean(0).numpy(), label=f"{g} ({len(curves)})")
        ax.set_title(f"{label}: energy of the LoRA delta vs rank")
        ax.set_xlabel("rank k")
        ax.set_xscale("log")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("fraction of ||dW||^2 in top-k")
    axes[1].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    from lbm_registry.fileio import atomic_path

    try:
        with atomic_path(dest) as tmp:
            fig.savefig(tmp, dpi=110, format="png")
    finally:
        plt.close(fig)
    return dest


def _data_uri(path: Path) -> str:
    import base64

    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def _fmt(v: Any) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, str) and len(v) == 64 and all(c in "0123456789abcdef" for c in v):
        return v[:12]
    return str(v)


def _table(headers: list[str], rows: list[list[Any]], highlight: set[int] | None = None) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = []
    for i, row in enumerate(rows):
        cls = ' class="diff"' if highlight and i in highlight else ""
        body.append(f"<tr{cls}>" + "".join(f"<td>{html.escape(_fmt(c))}</td>" for c in row) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def write_report(result: dict[str, Any], out_dir: Path, *, settings: WorkspaceSettings | None = None,
                 log_mlflow: bool = True) -> dict[str, Any]:
    """Write ``index.html`` + ``grid.png`` + ``energy.png`` + ``compare.json`` into ``out_dir``."""
    from lbm_registry.api.registry import resolve
    from lbm_registry.errors import ConfigError
    from lbm_registry.fileio import atomic_path, check_output_folder, make_folder
    from lbm_registry.lora.format import read_lora

    check_output_folder(out_dir, ConfigError, "--report")
    make_folder(out_dir, "--report")
    files = []
    a, b = result["a"], result["b"]
    if result.get("_grid") is not None:
        with atomic_path(out_dir / "grid.png") as tmp:
            result["_grid"].save(tmp, format="PNG")
        files.append("grid.png")
    st = settings or WorkspaceSettings.resolve()
    try:
        la = read_lora(resolve(a["ref"], st).path, check_finite=False)
        lb = read_lora(resolve(b["ref"], st).path, check_finite=False)
        energy_plot(la, lb, out_dir / "energy.png", (a["ref"], b["ref"]))
        files.append("energy.png")
    except Exception as exc:  # the plot is a nicety: never lose the report for it
        result.setdefault("report_warnings", []).append(f"energy plot skipped: {exc}")
    data = {k: v for k, v in result.items() if not k.startswith("_")}
    with atomic_path(out_dir / "compare.json") as tmp:
        tmp.write_text(json.dumps(data, indent=2, default=str))
    files.append("compare.json")

    keys = [k for k in a if k not in ("layers",)]
    diff_rows = {i for i, k in enumerate(keys) if k in result["different_facts"]}
    facts_html = _table(["fact", a["ref"], b["ref"]], [[k, a.get(k), b.get(k)] for k in keys], diff_rows)
    layer_rows = [[r["module"], r["group"], r["rank_a"], r["rank_b"], r["error_a"], r["error_b"], r["cosine"],
                   r["rel_diff"]] for r in result["most_different"]]
    layers_html = _table(["module", "group", "rank A", "rank B", "error A", "error B", "cosine", "rel. diff"],
                         layer_rows)
    metrics_html = ""
    if result.get("output_metrics"):
        metrics_html = "<h2>Outputs</h2>" + _table(
            ["pair", "MAE (0-255)", "PSNR dB", "LPIPS"],
            [[m["pair"], m["mae"], m["psnr"], m["lpips"]] for m in result["output_metrics"]])
        if not result.get("lpips"):
            metrics_html += "<p class=note>LPIPS skipped: its backbone weights are not cached locally.</p>"
    # Images are embedded (data: URIs) so the page is whole on its own: opened from disk, mailed,
    # or in MLflow's artifact preview (which serves each artifact alone, breaking relative links).
    imgs = "".join(f'<figure><img src="{_data_uri(out_dir / f)}" alt="{f}"><figcaption>{f}</figcaption></figure>'
                   for f in files if f.endswith(".png"))
    base_note = ("same base" if result["same_base"] else
                 "<strong>different bases</strong>: outputs are each on their own base")
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>compare {html.escape(a['ref'])} vs
{html.escape(b['ref'])}</title><style>
body{{font-family:system-ui,sans-serif;margin:1em;max-width:1200px}}
table{{border-collapse:collapse;margin:1em 0;max-width:100%}}
td,th{{border:1px solid #ccc;padding:3px 6px;font-size:13px}} th{{white-space:nowrap}}
td:first-child{{overflow-wrap:anywhere}} tr.diff td{{background:#fff3c4}}
img{{max-width:100%}} .note{{color:#666}}</style></head><body>
<h1>{html.escape(a['ref'])} vs {html.escape(b['ref'])}</h1>
<p>{base_note}; mean per-layer cosine of the deltas: {result['mean_cosine']:.4f}</p>
<h2>Facts</h2>{facts_html}<h2>Layers that differ most</h2>{layers_html}{metrics_html}{imgs}
<p class=note>Raw data: compare.json (next to this page and in the MLflow run's <code>report/</code>)</p>
</body></html>"""
    with atomic_path(out_dir / "index.html") as tmp:
        tmp.write_text(page)
    files.insert(0, "index.html")
    info: dict[str, Any] = {"dir": str(out_dir), "files": files}
    if log_mlflow:
        try:
            info["mlflow_run_id"] = _log(out_dir, result, st)
        except Exception as exc:  # report files exist either way; say why logging failed
            info["mlflow_error"] = str(exc).splitlines()[0]
    return info


def _version_link(ref: str, settings: WorkspaceSettings) -> tuple[str, str | None]:
    """(sha256, the MLflow UI link of a registered version or None)."""
    from lbm_registry.api.registry import show
    from lbm_registry.registry.pages import model_link

    try:
        shown = show(ref, settings)
    except Exception:
        return "", None
    mv = (shown.get("mlflow") or {}).get("model_version")
    return shown.get("sha256", ""), (model_link(shown["name"], mv) if shown.get("name") else None)


def _log(out_dir: Path, result: dict[str, Any], settings: WorkspaceSettings) -> str | None:
    """The compare run: tagged with both versions (``lbm.compared`` = both sha256s, searchable),
    a description linking both version pages; both versions' pages link back to it."""
    from lbm_registry.registry.pages import COMPARE_EXPERIMENT
    from lbm_registry.registry.runs import MLflowTracker

    a, b = result["a"], result["b"]
    (sha_a, link_a), (sha_b, link_b) = _version_link(a["ref"], settings), _version_link(b["ref"], settings)
    sha_a, sha_b = sha_a or a.get("sha256") or "", sha_b or b.get("sha256") or ""

    def md(ref: str, link: str | None) -> str:
        return f"[{ref}]({link})" if link else f"`{ref}`"

    metrics = result.get("output_metrics") or []
    lines = [f"**Compare** {md(a['ref'], link_a)} vs {md(b['ref'], link_b)}", "", "| | |", "|---|---|",
             f"| same base | {'yes' if result['same_base'] else '**no**'} |",
             f"| mean per-layer cosine | {result['mean_cosine']:.4f} |"]
    lines += [f"| {m['pair']} (MAE / PSNR) | {m['mae']:.3g} / {m['psnr']:.3g} dB |" for m in metrics]
    lines += ["", "The whole report: `report/index.html` (self-contained) under Artifacts."]
    tags = {"lbm.kind": "compare", "lbm.a_ref": a["ref"], "lbm.b_ref": b["ref"], "lbm.a_sha256": sha_a,
            "lbm.b_sha256": sha_b, "lbm.compared": f"{sha_a},{sha_b}", "mlflow.note.content": "\n".join(lines)}
    tracker = MLflowTracker(settings.effective_tracking_uri, COMPARE_EXPERIMENT, home=settings.home,
                            run_name=f"compare {a['ref']} vs {b['ref']}", tags=tags)
    params = {"a": a["ref"], "b": b["ref"], "same_base": result["same_base"]}
    if result.get("sampling"):   # the output images were made: how (posterior sample, tiled decode)
        params.update(result["sampling"])
    tracker.log_params(params)
    tracker.log_metrics({"mean_cosine": result["mean_cosine"]}, step=0)
    for f in sorted(out_dir.iterdir()):
        if f.is_file():
            tracker.log_artifact(f, "report")
    tracker.end()
    from lbm_registry.api.registry import refresh_pages

    refresh_pages([a["ref"], b["ref"]], settings)
    return tracker.run_id
