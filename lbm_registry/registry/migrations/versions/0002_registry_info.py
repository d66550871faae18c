"""registry_info: key/value facts about the catalog itself, starting with its catalog_id

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-28

``catalog_id`` (a random UUID, fixed at creation) is tagged on every MLflow run and model
version this catalog mirrors (``lbm.catalog_id``), so several registries can share one MLflow
tracking server without ``doctor --repair`` taking each other's runs for orphans.

After adding a revision, bump ``SCHEMA_HEAD`` in lbm_registry/registry/schema.py (a test
checks they agree): the hot path compares the database's revision against that constant
instead of importing Alembic.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    info = op.create_table(
        "registry_info",
        sa.Column("key", sa.String(64), primary_key=True),
        sa.Column("value", sa.Text(), nullable=False),
    )
    op.bulk_insert(info, [{"key": "catalog_id", "value": uuid.uuid4().hex}])


def downgrade() -> None:
    op.drop_table("registry_info")
