"""Where a registry lives: ``--home``, else ``$LBM_REG_HOME``, else ``./mlruns``."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class WorkspaceSettings:
    """Locations of one registry. Cheap to build: nothing is opened or created here."""

    home: Path
    catalog_url: str | None = None
    tracking_uri: str | None = None

    @classmethod
    def resolve(cls, home: str | Path | None = None, catalog_url: str | None = None,
                tracking_uri: str | None = None) -> WorkspaceSettings:
        raw = Path(home or os.environ.get("LBM_REG_HOME") or "mlruns")
        try:
            h = raw.expanduser().absolute()
        except RuntimeError:  # ~user of no known user
            from lbm_registry.errors import RegistryError

            raise RegistryError(f"home {str(raw)[:80]!r}: no such user's home folder to expand") from None
        return cls(
            home=h,
            catalog_url=catalog_url or os.environ.get("LBM_REG_CATALOG_URL") or None,
            tracking_uri=tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or None,
        )

    @property
    def effective_catalog_url(self) -> str:
        return self.catalog_url or f"sqlite:///{self.home / 'catalog.db'}"

    @property
    def effective_tracking_uri(self) -> str:
        return self.tracking_uri or f"sqlite:///{self.home / 'mlflow.db'}"

    @property
    def blobs_dir(self) -> Path:
        return self.home / "blobs" / "sha256"
