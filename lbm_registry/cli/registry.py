"""Registry commands: init, import, list, show, lineage, alias, doctor, gc, ui.

Parse, call :mod:`lbm_registry.api.registry`, render (Rich tables/trees or ``--json``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from lbm_registry.cli._common import (
    JSON_OPTION,
    PROBE_OPTION,
    LazyProgress,
    console,
    fail,
    print_json,
    probe_mode,
    probe_note,
    settings,
)
from lbm_registry.units import format_size

alias_app = typer.Typer(help="Manage aliases: movable names such as prod or staging.", no_args_is_help=True)


def _short(sha: str | None, n: int = 12) -> str:
    return (sha or "")[:n]


def _num(v: Any, fmt: str = "{:.4g}") -> str:
    return "" if v is None else (fmt.format(v) if isinstance(v, float) else str(v))


def init(ctx: typer.Context, as_json: bool = JSON_OPTION) -> None:
    """Create (or upgrade) the workspace: catalog, MLflow DB, blob store."""
    from lbm_registry.api.registry import init_workspace

    info = init_workspace(settings(ctx))
    if as_json:
        print_json(info)
        return
    con = console()
    con.print(f"[green]workspace ready[/] {info['home']}")
    con.print(f"  catalog   {info['catalog']} (schema {info['schema']})")
    con.print(f"  mlflow    {info['tracking_uri']} (experiment lbm-registry, id {info['experiment_id']})")
    con.print(f"  blobs     {info['blobs']}")


def import_(
    ctx: typer.Context,
    file: Path = typer.Argument(..., help="Weight file (or a PEFT/diffusers LoRA folder) to register."),
    name: str = typer.Option(..., "--name", help="Asset name."),
    kind: str = typer.Option(..., "--kind", help="base, model or lora."),
    config: Path | None = typer.Option(None, "--config", help="LBM config YAML, ours or upstream LBM's model config "
                                       "(default: from the file's metadata, or the upstream config a .ckpt records)."),
    base: str | None = typer.Option(None, "--base", help="lora: the base REF it applies to; model: the base it "
                                                         "was fine-tuned from (recorded as its lineage)."),
    rank: int | None = typer.Option(None, "--rank", help="lora, LoHa/LoKr/DoRA/diff layers: rank [32]."),
    conv_rank: int | None = typer.Option(None, "--conv-rank", help="... conv-layer rank [16]."),
    energy: float | None = typer.Option(None, "--energy", help="... keep this fraction of each delta's energy."),
    budget: str | None = typer.Option(None, "--budget", help="... total file size, e.g. 200MB."),
    max_rank: int | None = typer.Option(None, "--max-rank", help="... cap on any layer's rank."),
    allow_duplicate: bool = typer.Option(False, "--allow-duplicate",
                                         help="Register bytes that are already registered as a new version."),
    fix_alpha: bool = typer.Option(False, "--fix-alpha", help="lora: where alpha exceeds a rank clipped to the "
                                   "layer's smallest side (the original extract_lora_native.py's bug), register "
                                   "alpha = rank (recorded on the version)."),
    probe: str | None = PROBE_OPTION,
    as_json: bool = JSON_OPTION,
) -> None:
    """Register an existing LBM checkpoint (base or model) or a LoRA (native, kohya, LyCORIS, PEFT)."""
    mode = probe_mode(probe)
    if kind == "lora":
        from lbm_registry.cli.algebra import import_lora

        import_lora(ctx, file, name=name, base=base, rank=rank, conv_rank=conv_rank, energy=energy, budget=budget,
                    max_rank=max_rank, allow_duplicate=allow_duplicate, as_json=as_json, probe=mode,
                    fix_alpha=fix_alpha)
        return
    if fix_alpha:
        fail("--fix-alpha is for --kind lora")
    from lbm_registry.api.assets.models import import_model

    with console(stderr=True).status(f"verifying, hashing and registering {file.name} ..."):
        asset = import_model(file, name=name, kind=kind, settings=settings(ctx), config=config,
                             allow_duplicate=allow_duplicate, probe=mode, base=base)
    if as_json:
        print_json({"ref": asset.ref, "kind": asset.kind, "sha256": asset.sha256, "path": str(asset.path),
                    "size": asset.facts.get("size"), "dtype": asset.facts.get("dtype")})
        return
    console().print(f"[green]registered[/] {asset.ref} ({asset.kind}, {format_size(asset.facts.get('size', 0))}, "
                    f"{asset.facts.get('dtype') or '?'}, sha256 {_short(asset.sha256)})")
    from rich.markup import escape

    for note in asset.facts.get("notes") or []:
        console(stderr=True).print(f"[cyan]note:[/] {escape(note)}", soft_wrap=True)
    probe_note(mode, ctx, as_json)


def list_(ctx: typer.Context, kind: str | None = typer.Option(None, "--kind", help="base, model or lora."),
          as_json: bool = JSON_OPTION) -> None:
    """List assets and their latest versions."""
    from lbm_registry.api.registry import list_assets

    rows = list_assets(settings(ctx), kind)
    if as_json:
        print_json(rows)
        return
    con = console()
    if not rows:
        con.print(f"no assets in {settings(ctx).home}" + (f" of kind {kind}" if kind else ""))
        return
    from rich.table import Table

    t = Table(title=f"assets in {settings(ctx).home}", title_justify="left")
    for col, just in (("name", "left"), ("kind", "left"), ("latest", "right"), ("versions", "right"),
                      ("size", "right"), ("dtype", "left"), ("rank", "left"), ("quality", "right"),
                      ("aliases", "left"), ("sha256", "left"), ("created", "left")):
        t.add_column(col, justify=just, no_wrap=col in ("name", "sha256"))
    for r in rows:
        rank = ""
        if r["kind"] == "lora":
            rank = "/".join(str(x) for x in (r["rank"], r["conv_rank"]) if x is not None) or (r["policy"] or "")
            rr = r.get("rank_range") or {}
            policy = str(r["policy"] or "")
            if rr and not policy.startswith("fixed"):  # energy/budget/trained: ranks differ per layer
                rank = "/".join(f"{lo}-{hi}" if lo != hi else str(lo)
                                for lo, hi in (rr[k] for k in ("linear", "conv") if k in rr))
                if policy:
                    rank += f" ({policy})"
        aliases = ", ".join(f"{a}→{n}" for a, n in r["aliases"].items())
        t.add_row(r["name"], r["kind"], str(r["latest"]), str(r["versions"]), format_size(r["size"]),
                  r["dtype"] or "", rank, _quality(r.get("quality")), aliases, _short(r["sha256"]),
                  (r["created_at"] or "")[:16].replace("T", " "))
    con.print(t)


QUALITY_LABELS = {"functional_error": "functional err", "mean_error": "mean err", "val_loss_after": "val loss"}


def _quality(q: dict | None) -> str:
    """``0.0123 mean err``: the version's quality figure and which one it is (LoRAs: the
    functional error once validated, else the mean per-layer error; trained: validation loss)."""
    if not q:
        return ""
    return f"{_num(q['value'])} {QUALITY_LABELS.get(q['metric'], q['metric'])}"


def show(ctx: typer.Context, ref: str = typer.Argument(...), as_json: bool = JSON_OPTION) -> None:
    """All facts of one version: hashes, ranks, errors, lineage, aliases."""
    from lbm_registry.api.registry import show as api_show

    info = api_show(ref, settings(ctx))
    if as_json:
        print_json(info)
        return
    from rich.table import Table

    con = console()
    t = Table(show_header=False, title=info["ref"], title_justify="left", box=None, padding=(0, 2))
    t.add_column(style="bold")
    t.add_column(overflow="fold")
    if info["kind"] == "file":
        for k in ("kind", "path", "sha256", "dtype"):
            t.add_row(k, str(info.get(k) or ""))
        t.add_row("size", format_size(info["size"]))
        con.print(t)
        return
    t.add_row("kind", info["kind"])
    t.add_row("sha256", info["sha256"])
    t.add_row("size", f"{format_size(info['size'])} ({info['size']:,} bytes)")
    t.add_row("dtype", info["dtype"] or "?")
    t.add_row("created", f"{info['created_at']} (lbm-registry {info['tool_version']})")
    t.add_row("blob", info["path"] + ("" if info["integrity"] == "ok" else f"  [red]{info['integrity'].upper()}[/]")
              + ("" if info.get("cached", True) else "  (not in this home yet: fetched on first use or by pull)"))
    t.add_row("versions", ", ".join(str(v) for v in info["versions"]))
    if info["asset_aliases"]:
        t.add_row("aliases", ", ".join(f"{a}→{n}" for a, n in info["asset_aliases"].items()))
    if info.get("quality"):
        t.add_row("quality", _quality(info["quality"]))
    ml = info["mlflow"]
    t.add_row("mlflow", f"model version {ml['model_version']}, run {ml['run_id']}")
    lin = info["lineage"]
    for role in ("base", "tuned", "parent"):
        if role in lin:
            for i, e in enumerate(lin.get("parents") or [lin[role]] if role == "parent" else [lin[role]]):
                t.add_row(role if i == 0 else "", f"{e['ref'] or '(unregistered)'}  sha256 {_short(e['sha256'])}")
    if lin.get("datasets"):
        t.add_row("datasets", f"{len(lin['datasets'])} shard(s): " +
                  ", ".join(Path(d['path'] or '?').name for d in lin["datasets"][:4]))
    if info["descendants"]:
        t.add_row("used by", ", ".join(f"{d['ref']} ({d['role']})" for d in info["descendants"][:8]))
    skip = {"size", "dtype", "base_sha256", "tuned_sha256", "parent_sha256", "training_config"}
    for k, v in info["facts"].items():
        if k in skip or v is None or v == "" or v == [] or v == {}:
            continue  # nothing recorded (e.g. a seeded base's sdxl_unet): no empty row
        if k == "validation" and isinstance(v, dict):
            t.add_row(k, _validation_text(v))
            continue
        if isinstance(v, list) and len(v) > 6:
            v = f"[{len(v)} items]"
        t.add_row(k, _num(v) if not isinstance(v, dict) else _flat(v))
    for k, v in info["tags"].items():
        t.add_row(f"tag {k}", v)
    con.print(t)
    layers = info["layers"]
    worst = sorted((r for r in layers or [] if r["rel_error"] is not None), key=lambda r: -r["rel_error"])[:5]
    if layers and not worst:  # a trained LoRA: ranks, but no extraction errors to rank by
        con.print(f"{len(layers)} layers (no per-layer errors recorded: it was not extracted from a model)")
    if worst:
        lt = Table(title=f"{len(layers)} layers; worst relative errors", title_justify="left")
        for col in ("module", "kind", "shape", "rank", "rel_error", "energy"):
            lt.add_column(col, justify="right" if col in ("rank", "rel_error", "energy") else "left")
        for r in worst:
            lt.add_row(r["module"], r["kind"] or "", r["shape"] or "", _num(r["rank"]), _num(r["rel_error"]),
                       _num(r["energy"]))
        con.print(lt)


def _flat(d: dict[str, Any]) -> str:
    """``a=1, b.c=2``: nested dicts flattened one level, empty values left out."""
    parts = []
    for k, v in d.items():
        if isinstance(v, dict):
            parts += [f"{k}.{a}={_num(b)}" for a, b in v.items() if b not in (None, "", [], {})
                      and not isinstance(b, dict | list)]
        elif v not in (None, "", [], {}) and not isinstance(v, list):
            parts.append(f"{k}={_num(v)}")
    return ", ".join(parts)


def _validation_text(v: dict[str, Any]) -> str:
    """The recorded validation in words: errors, functional check, coverage, when."""
    parts = []
    if v.get("mean_error") is not None:
        parts.append(f"rel. error mean {v['mean_error']:.4g} max {v.get('max_error', 0):.4g}")
    if v.get("total_energy") is not None:
        parts.append(f"energy kept {v['total_energy']:.4f}")
    f = v.get("functional") or {}
    if f.get("functional_error") is not None:
        parts.append(f"functional error {f['functional_error']:.4g} (recovered {f.get('recovered', 0):.2%})")
    c = v.get("coverage") or {}
    if c.get("expected"):
        parts.append(f"coverage {c.get('found')}/{c['expected']}")
    if v.get("validated_at"):
        parts.append(f"at {v['validated_at']}")
    return "; ".join(parts) or _flat(v)


def _tree_label(node: dict[str, Any], role: str | None = None) -> str:
    from rich.markup import escape

    prefix = f"[dim]{role}:[/] " if role else ""
    if node.get("name"):
        return f"{prefix}[bold]{escape(node['ref'])}[/] ({node['kind']}) [dim]{_short(node.get('sha256'))}[/]"
    what = node.get("path") or node.get("ref") or "?"
    return f"{prefix}{escape(str(what))} [dim](unregistered) {_short(node.get('sha256'))}[/]"


def lineage(ctx: typer.Context, ref: str = typer.Argument(...), as_json: bool = JSON_OPTION) -> None:
    """The lineage tree: up to the base, down to descendants."""
    from lbm_registry.api.registry import lineage_tree

    tree = lineage_tree(ref, settings(ctx))
    if as_json:
        print_json(tree)
        return
    from rich.tree import Tree

    root = Tree(_tree_label(tree["node"]))
    if tree["up"]:
        up = root.add("[cyan]made from[/]")

        def add_up(parent: Any, items: list[dict[str, Any]]) -> None:
            for it in items:
                add_up(parent.add(_tree_label(it, it["role"])), it.get("up") or [])

        add_up(up, tree["up"])
    if tree["down"]:
        down = root.add("[magenta]descendants[/]")

        def add_down(parent: Any, items: list[dict[str, Any]]) -> None:
            for it in items:
                add_down(parent.add(_tree_label(it, f"as {it['role']}")), it.get("down") or [])

        add_down(down, tree["down"])
    console().print(root)


@alias_app.command("set")
def alias_set(ctx: typer.Context, ref: str = typer.Argument(..., help="The version: NAME@N, NAME@ALIAS, ..."),
              alias: str = typer.Argument(..., help="The alias to point at it, e.g. prod."),
              as_json: bool = JSON_OPTION) -> None:
    """Point ALIAS at the version REF resolves to."""
    from lbm_registry.api.registry import set_alias

    r = set_alias(ref, alias, settings(ctx))
    if as_json:
        print_json(r)
        return
    moved = f" (was {r['name']}@{r['previous']})" if r["previous"] not in (None, r["version"]) else ""
    console().print(f"{r['name']}@{r['alias']} → {r['name']}@{r['version']}{moved}")


@alias_app.command("rm")
def alias_rm(ctx: typer.Context, name: str = typer.Argument(..., help="The asset name."),
             alias: str = typer.Argument(..., help="The alias to remove."), as_json: bool = JSON_OPTION) -> None:
    """Remove an alias."""
    from lbm_registry.api.registry import remove_alias

    r = remove_alias(name, alias, settings(ctx))
    if as_json:
        print_json(r)
        return
    console().print(f"removed {r['name']}@{r['alias']} (pointed at {r['name']}@{r['version']})")


def _render_report(report: dict[str, Any], title: str) -> None:
    from rich.table import Table

    con = console()
    if not report["issues"]:
        con.print(f"[green]{title}: no problems[/] ({report['home']})")
        return
    t = Table(title=f"{title}: {report['home']}", title_justify="left")
    for col in ("problem", "subject", "detail", "action"):
        t.add_column(col, overflow="fold")
    for i in report["issues"]:
        action = i["action"] or ("" if report.get("repair", True) else "run with --repair")
        style = "green" if i["fixed"] else "red"
        t.add_row(f"[{style}]{i['kind']}[/]", i["subject"], i["detail"], action)
    con.print(t)
    con.print(f"{report['fixed']} fixed, {report['remaining']} remaining")


def doctor(ctx: typer.Context, repair: bool = typer.Option(False, "--repair", help="Fix what can be fixed."),
           as_json: bool = JSON_OPTION) -> None:
    """Find drift between catalog, MLflow and blobs (exit 1 while problems remain)."""
    from lbm_registry.api.registry import doctor as api_doctor

    if as_json:
        report = api_doctor(settings(ctx), repair=repair)
        print_json(report)
    else:
        with LazyProgress(transient=True) as bar:
            tasks: list[Any] = []

            def progress(what: str, done: int, total: int) -> None:
                if not tasks:
                    tasks.append(bar.add_task(what, total=None))
                bar.update(tasks[0], description=what, completed=done, total=total or None)

            report = api_doctor(settings(ctx), repair=repair, progress=progress)
        _render_report(report, "doctor")
    if report["remaining"]:
        raise typer.Exit(1)


def gc(ctx: typer.Context, cache: bool = typer.Option(
        False, "--cache", help="Also drop this home's copies of blobs the tracking server holds (never the only copy)."),
        as_json: bool = JSON_OPTION) -> None:
    """Remove unreferenced blobs and failed registrations."""
    from lbm_registry.api.registry import gc as api_gc

    report = api_gc(settings(ctx), cache=cache)
    if as_json:
        print_json(report)
        return
    if not report["issues"]:
        console().print("[green]gc: nothing to remove[/]")
        return
    _render_report(report, "gc")


def pull(ctx: typer.Context, ref: str = typer.Argument(..., help="A registered version (NAME, NAME@N, ...)."),
         as_json: bool = JSON_OPTION) -> None:
    """Fetch a version's weights, and its base's, from the tracking server into this home."""
    from lbm_registry.api.registry import pull as api_pull
    from lbm_registry.units import format_size

    result = api_pull(ref, settings(ctx))
    if as_json:
        print_json(result)
        return
    con = console()
    for b in result["blobs"]:
        how = {"fetched": f"fetched in {b['seconds']:.1f} s", "cached": "already here",
               "local": "in this home (no tracking server to fetch from)"}[b["status"]]
        con.print(f"{b['ref']} ({b['role']}, {format_size(b['size'])}, sha256 {_short(b['sha256'])}): {how}")


def ui(ctx: typer.Context, host: str = typer.Option("127.0.0.1", "--host", help="Interface to bind."),
       port: int = typer.Option(5000, "--port", min=1, max=65535, help="Port to listen on."),
       open_browser: bool = typer.Option(False, "--open", help="Open the page in the browser once it is up.")) -> None:
    """Start the MLflow UI on this workspace (one process; Ctrl-C stops it)."""
    import os
    import sys

    from lbm_registry.api.registry import ui_command, ui_url

    cmd = ui_command(settings(ctx), host=host, port=port, open_browser=open_browser)
    console(stderr=True).print(f"MLflow UI for {settings(ctx).home}: {ui_url(host, port)} (Ctrl-C to stop)",
                               soft_wrap=True, highlight=False)
    sys.stdout.flush()
    sys.stderr.flush()
    # Become the server (no wrapper process): signals reach it directly, nothing is orphaned.
    os.execve(cmd[0], cmd, {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"})


def mlflow_serve(ctx: typer.Context, ref: str = typer.Argument(..., help="A registered version (NAME@N, NAME@ALIAS)."),
                 host: str = typer.Option("127.0.0.1", "--host", help="Interface to bind."),
                 port: int = typer.Option(5001, "--port", min=1, max=65535, help="Port to listen on."),
                 workers: int = typer.Option(1, "--workers", min=1, max=64,
                                             help="MLflow model server workers (each loads the model).")) -> None:
    """Serve a version as an MLflow model (`mlflow models serve`), from any shell: no activated venv needed."""
    import os
    import shlex
    import sys

    from lbm_registry.api.registry import mlflow_serve_command

    cmd, env, uri = mlflow_serve_command(ref, settings(ctx), host=host, port=port, workers=workers)
    err = console(stderr=True)
    err.print(f"serving {ref} ({uri}) at http://{host}:{port}/invocations (Ctrl-C to stop)", soft_wrap=True,
              highlight=False)
    err.print(f"$ {shlex.join(['mlflow', *cmd[3:]])}", soft_wrap=True, highlight=False, markup=False)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(cmd[0], cmd, env)


def register(app: typer.Typer) -> None:
    app.command("init")(init)
    app.command("import")(import_)
    app.command("list")(list_)
    app.command("show")(show)
    app.command("lineage")(lineage)
    app.add_typer(alias_app, name="alias")
    app.command("doctor")(doctor)
    app.command("gc")(gc)
    app.command("pull")(pull)
    app.command("ui")(ui)
    app.command("mlflow-serve")(mlflow_serve)
