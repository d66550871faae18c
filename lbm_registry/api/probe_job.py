"""Kept for ``python -m lbm_registry.api.probe_job NAME@N SHA256`` (documented, and started
detached by versions before the API was grouped by use case). The job lives in
:mod:`lbm_registry.api.run.probe_job`."""

import sys

from lbm_registry.api.run.probe_job import draw_and_attach, main

__all__ = ["draw_and_attach", "main"]

if __name__ == "__main__":
    sys.exit(main())
