"""``compare A B``: two LoRAs (or versions) side by side — facts, per-layer similarity, outputs.

Per-layer similarity works on the factors (see ``lora.similarity``): comparing two SDXL-sized
LoRAs never materialises a 2.4 B-parameter delta.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lbm_registry.errors import RefError
from lbm_registry.settings import WorkspaceSettings

if TYPE_CHECKING:
    from PIL import Image

    from lbm_registry.api.registry import ResolvedAsset
    from lbm_registry.lora.format import LoRAFile

FACT_KEYS = ("kind", "ref", "sha256", "base_sha256", "tuned_sha256", "rank", "conv_rank", "policy", "alpha", "size",
             "mean_error", "max_error", "functional_error", "parent", "created")
BARE_VERSION = re.compile(r"^v?\d+$")


@dataclass
class Side:
    asset: ResolvedAsset
    facts: dict[str, Any]


def resolve_pair(a: str, b: str, settings: WorkspaceSettings) -> tuple[ResolvedAsset, ResolvedAsset]:
    """Resolve both refs; a bare ``vN``/``N`` means version N of the other argument's model."""
    from lbm_registry.api.registry import resolve

    if BARE_VERSION.match(a) and not BARE_VERSION.match(b):
        rb = resolve(b, settings)
        return resolve(a, settings, relative_to=rb), rb
    ra = resolve(a, settings)
    return ra, resolve(b, settings, relative_to=ra)


def _facts(asset: ResolvedAsset, settings: WorkspaceSettings) -> dict[str, Any]:
    from lbm_registry.lora.format import read_lora

    facts = dict(asset.facts or {})
    info = read_lora(asset.path, check_finite=False).info if asset.kind in ("lora", "file") else {}
    out: dict[str, Any] = {"kind": asset.kind, "ref": asset.label, "sha256": asset.sha256}
    for k in FACT_KEYS[3:]:
        out[k] = facts.get(k, info.get(k))
    out["base_sha256"] = out["base_sha256"] or ((asset.lineage or {}).get("base") or {}).get("sha256")
    parent = (asset.lineage or {}).get("parent")
    out["parent"] = parent.get("ref") if isinstance(parent, dict) else parent
    out["size"] = out["size"] or asset.path.stat().st_size
    out["created"] = facts.get("created_at") or facts.get("created")
    return out


def layer_table(lora_a: Any, lora_b: Any, facts_a: dict, facts_b: dict) -> list[dict[str, Any]]:
    """Per module: ranks, recorded errors, cosine and relative difference of the deltas."""
    from lbm_registry.lora.similarity import cosine_and_difference, layer_group

    err_a = {row["module"]: row.get("rel_error") for row in facts_a.get("layers") or []}
    err_b = {row["module"]: row.get("rel_error") for row in facts_b.get("layers") or []}
    rows = []
    for m in sorted(set(lora_a.layers) | set(lora_b.layers)):
        la, lb = lora_a.layers.get(m), lora_b.layers.get(m)
        cos, diff = cosine_and_difference(la, lb) if la and lb else (0.0, 1.0)
        rows.append({
            "module": m, "group": layer_group(m),
            "rank_a": la.rank if la else 0, "rank_b": lb.rank if lb else 0,
            "error_a": err_a.get(m), "error_b": err_b.get(m),
            "cosine": cos, "rel_diff": diff,
        })
    return rows


def synthetic_source(size: tuple[int, int] = (256, 256), seed: int = 0) -> Image.Image:
    """A seeded stand-in image when no --source is given: shapes on a gradient."""
    import numpy as np
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    w, h = size
    grad = np.linspace(40, 200, w)[None, :, None] * np.ones((h, 1, 3))
    img = Image.fromarray(grad.astype("uint8"))
    draw = ImageDraw.Draw(img)
    for _ in range(5):
        x0, y0 = rng.integers(0, w - 40), rng.integers(0, h - 40)
        s = int(rng.integers(20, 80))
        fill = tuple(int(c) for c in rng.integers(0, 255, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)([x0, y0, x0 + s, y0 + s], fill=fill)
    return img


def _label_grid(columns: list[tuple[str, list[Image.Image]]]) -> Image.Image:
    from PIL import Image, ImageDraw

    rows = len(columns[0][1])
    cw = max(img.width for _, imgs in columns for img in imgs)
    ch = max(img.height for _, imgs in columns for img in imgs)
    grid = Image.new("RGB", (cw * len(columns), (ch + 16) * rows), "white")
    draw = ImageDraw.Draw(grid)
    for c, (title, imgs) in enumerate(columns):
        for r, img in enumerate(imgs):
            grid.paste(img, (c * cw, r * (ch + 16) + 16))
            draw.text((c * cw + 4, r * (ch + 16) + 2), title, fill="black")
    return grid


def run_outputs(a: ResolvedAsset, b: ResolvedAsset, images: list[Image.Image], *, tuned: str | None,
                settings: WorkspaceSettings, device: str = "auto", seed: int = 0,
                lora_b: LoRAFile | None = None) -> dict[str, Any]:
    """Base, A, B (and the tuned model when known) on the same images; pixel metrics, LPIPS if cached.

    ``lora_b``: B's file if the caller has already read it (it is not read again).
    """
    from lbm_registry.api.run.infer import load, plan_load
    from lbm_registry.lbm import metrics
    from lbm_registry.lora.format import read_lora

    outs: dict[str, list[Image.Image]] = {}
    pa = load(a.ref, settings=settings, device=device, force=True)
    outs["A"] = [pa(img, seed=seed) for img in images]
    outs["base"] = [pa(img, seed=seed, scale=0.0) for img in images]
    plan_b = plan_load(b.ref, settings=settings, force=True)
    if plan_b.base.sha256 == pa.info["base_sha256"] and pa.loras is not None:
        # Same base: swap B's LoRA into the loaded model instead of loading the base again.
        pa.loras.replace([(lora_b if lora_b is not None and asset.sha256 == b.sha256 else read_lora(asset.path), s)
                          for asset, s in plan_b.loras])
        outs["B"] = [pa(img, seed=seed, scale=1.0) for img in images]
        del pa
    else:
        del pa
        pb = load(b.ref, settings=settings, device=device, force=True)
        outs["B"] = [pb(img, seed=seed) for img in images]
        outs["base B"] = [pb(img, seed=seed, scale=0.0) for img in images]
        del pb
    if tuned:
        pt = load(tuned, settings=settings, device=device)
        outs["tuned"] = [pt(img, seed=seed) for img in images]
        del pt

    lp = metrics.LPIPSMetric() if metrics.lpips_available() else None
    pairs = [("A", "B"), ("A", "base"), ("B", "base")] + ([("A", "tuned"), ("B", "tuned")] if tuned else [])
    table = []
    for x, y in pairs:
        row = {"pair": f"{x} vs {y}",
               "mae": sum(metrics.mae(p, q) for p, q in zip(outs[x], outs[y], strict=True)) / len(images),
               "psnr": sum(metrics.psnr(p, q) for p, q in zip(outs[x], outs[y], strict=True)) / len(images)}
        row["lpips"] = (sum(lp(p, q) for p, q in zip(outs[x], outs[y], strict=True)) / len(images)) if lp else None
        table.append(row)
    return {"images": outs, "metrics": table, "lpips": lp is not None}


def compare(a_ref: str, b_ref: str, *, source: Path | None = None, report: Path | None = None,
            settings: WorkspaceSettings | None = None, device: str = "auto", outputs: bool = True,
            seed: int = 0) -> dict[str, Any]:
    """Compare two LoRA versions. Returns facts, per-layer rows, output metrics and written files."""
    settings = settings or WorkspaceSettings.resolve()
    if report is not None:  # where the report goes is checked before any work
        from lbm_registry.errors import ConfigError
        from lbm_registry.fileio import check_output_folder

        check_output_folder(report, ConfigError, "--report")
    if outputs:
        from lbm_registry.lbm.device import check_device

        check_device(device)  # one line for a typo or a missing GPU, before any work
    if report is not None:  # a file where the report folder goes is a usage error, found before any work
        from lbm_registry.errors import ConfigError
        from lbm_registry.fileio import folder_problem

        if (why := folder_problem(report)) is not None:
            raise ConfigError(f"cannot write the report: {why}", cli=f"--report: {why}")
    a, b = resolve_pair(a_ref, b_ref, settings)   # a wrong reference is refused before torch loads
    for x in (a, b):
        if x.kind not in ("lora", "file"):
            raise RefError(f"{x.label}: compare takes two LoRAs, this is a {x.kind}")

    from lbm_registry.api.run.infer import collect_images
    from lbm_registry.errors import DataError
    from lbm_registry.lbm.imaging import open_image
    from lbm_registry.lora.format import read_lora

    fa, fb = _facts(a, settings), _facts(b, settings)
    lora_a, lora_b = read_lora(a.path), read_lora(b.path)
    rows = layer_table(lora_a, lora_b, a.facts or {}, b.facts or {})
    same_base = bool(fa["base_sha256"]) and fa["base_sha256"] == fb["base_sha256"]
    diff_keys = [k for k in FACT_KEYS if k not in ("ref", "sha256", "created") and fa.get(k) != fb.get(k)]
    weights = [max(abs(r["rank_a"]), 1) for r in rows]
    mean_cos = sum(r["cosine"] * w for r, w in zip(rows, weights, strict=True)) / max(sum(weights), 1)
    result: dict[str, Any] = {
        "a": fa, "b": fb, "same_base": same_base, "different_facts": diff_keys,
        "layers": rows, "mean_cosine": mean_cos,
        "most_different": sorted(rows, key=lambda r: r["cosine"])[:10],
        "identical": a.sha256 == b.sha256,
    }
    if outputs:
        if source is not None:
            images, skipped = [], []
            for p in collect_images(Path(source)):
                try:
                    images.append(open_image(p))
                except DataError as exc:
                    skipped.append((p, getattr(exc, "reason", str(exc))))
            if not images:  # say why: a truncated file, a decompression bomb, not an image...
                if not Path(source).is_dir():
                    raise DataError(f"{source}: {skipped[0][1]}")
                raise DataError(f"no readable images in {source}" + (
                    f" ({len(skipped)} skipped; first: {skipped[0][0]}: {skipped[0][1]})" if skipped
                    else ": the folder is empty"))
        else:
            images = [synthetic_source(seed=seed)]
        tuned_sha = fa.get("tuned_sha256") or (a.facts or {}).get("tuned_sha256")
        tuned_ref = None
        if tuned_sha:
            from lbm_registry.api.registry import resolve

            try:
                tuned_ref = resolve(f"sha256:{tuned_sha}", settings).ref
            except RefError:
                tuned_ref = None
        out = run_outputs(a, b, images, tuned=tuned_ref, settings=settings, device=device, seed=seed,
                          lora_b=lora_b)
        result["output_metrics"] = out["metrics"]
        from lbm_registry.lbm.pipeline import sampling_params

        result["sampling"] = sampling_params()   # the pipelines' defaults: upstream's sample and tiles
        result["lpips"] = out["lpips"]
        result["output_columns"] = list(out["images"])
        columns = [("source", images)] + [(k, v) for k, v in out["images"].items()]
        result["_grid"] = _label_grid(columns)
    if report is not None:
        from lbm_registry.api.run.report import write_report

        result["report"] = write_report(result, Path(report), settings=settings)
    result.pop("_grid", None)
    return result
