"""Alembic environment for the lbm-registry catalog.

The registry runs these migrations itself (``lbm-reg init`` or first use) and hands over an
open connection in ``config.attributes["connection"]``. Run by hand, the URL comes from
``-x url=...``, ``sqlalchemy.url`` or ``$LBM_REG_CATALOG_URL``.
"""

from __future__ import annotations

import os

from alembic import context
from sqlalchemy import create_engine

from lbm_registry.registry.models import Base

config = context.config
target_metadata = Base.metadata


def _url() -> str:
    url = context.get_x_argument(as_dictionary=True).get("url") or config.get_main_option("sqlalchemy.url")
    url = url or os.environ.get("LBM_REG_CATALOG_URL")
    if not url:
        raise SystemExit("give the catalog URL: alembic -x url=sqlite:///mlruns/catalog.db upgrade head")
    return url


def _run(connection) -> None:
    # render_as_batch lets later migrations ALTER tables on SQLite (copy-and-move).
    context.configure(connection=connection, target_metadata=target_metadata, render_as_batch=True,
                      compare_type=True)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_offline() -> None:
    context.configure(url=_url(), target_metadata=target_metadata, literal_binds=True, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    engine = create_engine(_url())
    try:
        with engine.begin() as conn:
            _run(conn)
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
