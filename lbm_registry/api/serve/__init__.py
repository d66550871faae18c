"""api/serve: the serving use case. :class:`Server` (``lbm-reg serve``'s engine wired to the
registry), Ray Serve replicas (:mod:`.ray_serve`) and the MLflow pyfunc model (:mod:`.pyfunc`).

May import: api/run (loading a pipeline), api/registry, and the floors below the API (serve/,
lbm/, lora/, registry/, leaves). Nothing in api/ but the demo imports it. The CLI's ``serve``
reaches the HTTP app and the device checks through here, so it never goes around the API.
"""

from __future__ import annotations

from lbm_registry.api.serve.server import Server
from lbm_registry.lbm.device import check_device, check_dtype
from lbm_registry.serve.app import create_app

__all__ = ["Server", "check_device", "check_dtype", "create_app"]
