"""The background probe: ``python -m lbm_registry.api.run.probe_job NAME@N SHA256``.

Started detached by :func:`lbm_registry.api.run.probe.start_background` once a version is registered
and ready. It resolves the version (refusing it if the reference now names other bytes), draws the
probe strip exactly as an in-process registration would (api/probe.py), adds ``probe.png`` to the
version's run (written atomically into a local artifact folder, uploaded to a server) and rebuilds
the version page, which then shows the picture. The workspace comes from the environment
(``LBM_REG_HOME``, ``LBM_REG_CATALOG_URL``, ``MLFLOW_TRACKING_URI``).

It writes exactly one line to its log (stdout, ``<home>/logs/probe.log``): what it attached, or
why there is no picture. It never changes the registration itself.
"""

from __future__ import annotations

import logging
import sys
import tempfile
import time
import warnings
from pathlib import Path

from lbm_registry.settings import WorkspaceSettings


def draw_and_attach(settings: WorkspaceSettings, ref: str, sha256: str) -> str:
    """Draw the probe of ``ref`` and attach it; returns what was done (raises on failure)."""
    from lbm_registry.api.registry import attach_artifact, resolve
    from lbm_registry.api.run.probe import draw_probe
    from lbm_registry.errors import RegistryError

    asset = resolve(ref, settings)
    if asset.sha256 != sha256 or asset.name is None or asset.version is None:
        raise RegistryError(f"{ref} no longer names the registered bytes sha256:{sha256[:12]}")
    with tempfile.TemporaryDirectory(prefix="lbm-probe-") as tmp:
        if asset.kind == "lora":
            base = (asset.lineage.get("base") or {}).get("sha256")
            if not base:
                raise RegistryError(f"{ref} records no base")
            base_asset = resolve(f"sha256:{base}", settings, ("base", "model"))
            png = draw_probe(Path(tmp), base_path=base_asset.path, config=base_asset.config, lora_path=asset.path,
                             kind="lora")
        else:  # a model that names its base shows it too: source | base | this model
            base = (asset.lineage.get("base") or {}).get("sha256") if asset.kind == "model" else None
            base_path = resolve(f"sha256:{base}", settings, ("base", "model")).path if base else asset.path
            png = draw_probe(Path(tmp), base_path=base_path, config=asset.config, kind=asset.kind,
                             model_path=asset.path, label="this base" if asset.kind == "base" else "this model")
        attach_artifact(asset, png, settings)
    return f"attached {png.name} to {asset.ref}"


def main(argv: list[str] | None = None) -> int:
    from lbm_registry.api.run.probe import one_line

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python -m lbm_registry.api.run.probe_job NAME@N SHA256", file=sys.stderr)
        return 2
    ref, sha = args
    warnings.simplefilter("ignore")
    logging.disable(logging.WARNING)  # the one line below says what happened
    t0 = time.perf_counter()
    try:
        done = draw_and_attach(WorkspaceSettings.resolve(), ref, sha)
    except Exception as exc:
        done = f"probe of {ref} failed: {one_line(exc)}"
    print(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {done} ({time.perf_counter() - t0:.1f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
