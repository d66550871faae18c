"""The house stays drawn: imports point down the floors only (cli > api > serve | train >
registry | lora > lbm > leaves > errors; inside api: demo > serve | train > assets > run >
registry), the image server knows no registry, and no package's modules import each other in a
circle. The contracts live in pyproject.toml (``[tool.importlinter]``); the picture in
docs/layers.md. grimp reads every import statement, those inside functions (our lazy imports)
included, so a lazy upward import breaks a contract as surely as one at the top."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_imports_point_down_and_form_no_circle(capsys):
    """On failure the report below names each broken contract and the offending import chain
    (``a.b -> c.d (l.12)``) or the import that closes a circle."""
    from importlinter.application.use_cases import lint_imports
    from importlinter.configuration import configure

    configure()  # what the lint-imports command does first: the readers of pyproject.toml
    kept = lint_imports(config_filename=str(ROOT / "pyproject.toml"), cache_dir=None, no_logo=True)
    report = capsys.readouterr().out
    assert kept, report
    assert "0 broken" in report, report


def test_nothing_below_the_front_door_imports_the_package_root():
    """``lbm_registry/__init__`` (``load``, ``__version__``) imports the API, so a module that
    imports the root reaches torch code through it: import :mod:`lbm_registry.version` instead."""
    import grimp

    graph = grimp.build_graph("lbm_registry", cache_dir=None)
    importers = sorted(graph.find_modules_that_directly_import("lbm_registry"))
    assert importers == [], [
        f"{m} (l.{d['line_number']}: {d['line_contents']})" for m in importers
        for d in graph.get_import_details(importer=m, imported="lbm_registry")]
