"""initial catalog: assets, versions, lineage, LoRA facts, layer errors, aliases, tags, events,
file hash cache

Revision ID: 0001
Revises:
Create Date: 2026-11-28
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "assets",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.UniqueConstraint("name"),
    )
    op.create_table(
        "versions",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("asset_id", sa.Integer(), sa.ForeignKey("assets.id", ondelete="CASCADE"), nullable=False),
        sa.Column("number", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("dtype", sa.String(16), nullable=True),
        sa.Column("blob_path", sa.Text(), nullable=False),
        sa.Column("file_name", sa.Text(), nullable=True),
        sa.Column("mlflow_run_id", sa.String(64), nullable=True),
        sa.Column("mlflow_version", sa.String(32), nullable=True),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("tool_version", sa.String(32), nullable=False),
        sa.Column("config_json", sa.Text(), nullable=True),
        sa.Column("facts_json", sa.Text(), nullable=False),
        sa.Column("params_json", sa.Text(), nullable=False),
        sa.Column("metrics_json", sa.Text(), nullable=False),
        sa.Column("owner", sa.String(255), nullable=True),
        sa.Column("integrity", sa.String(16), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.UniqueConstraint("asset_id", "number", name="uq_versions_asset_number"),
    )
    op.create_index("ix_versions_asset_id", "versions", ["asset_id"])
    op.create_index("ix_versions_status", "versions", ["status"])
    op.create_index("ix_versions_sha256", "versions", ["sha256"])
    op.create_index("ix_versions_asset_status", "versions", ["asset_id", "status"])

    op.create_table(
        "lineage",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("version_id", sa.Integer(), sa.ForeignKey("versions.id", ondelete="CASCADE"), nullable=False),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("target_version_id", sa.Integer(), sa.ForeignKey("versions.id", ondelete="SET NULL"),
                  nullable=True),
        sa.Column("sha256", sa.String(64), nullable=True),
        sa.Column("ref", sa.Text(), nullable=True),
        sa.Column("path", sa.Text(), nullable=True),
    )
    op.create_index("ix_lineage_version_id", "lineage", ["version_id"])
    op.create_index("ix_lineage_target_version_id", "lineage", ["target_version_id"])
    op.create_index("ix_lineage_sha256", "lineage", ["sha256"])

    op.create_table(
        "lora_facts",
        sa.Column("version_id", sa.Integer(), sa.ForeignKey("versions.id", ondelete="CASCADE"),
                  primary_key=True),
        sa.Column("rank", sa.Integer(), nullable=True),
        sa.Column("conv_rank", sa.Integer(), nullable=True),
        sa.Column("policy", sa.Text(), nullable=True),
        sa.Column("alpha", sa.Float(), nullable=True),
        sa.Column("file_size", sa.BigInteger(), nullable=True),
        sa.Column("mean_error", sa.Float(), nullable=True),
        sa.Column("max_error", sa.Float(), nullable=True),
        sa.Column("functional_error", sa.Float(), nullable=True),
        sa.Column("n_layers", sa.Integer(), nullable=True),
        sa.Column("n_skipped", sa.Integer(), nullable=True),
    )

    op.create_table(
        "layer_errors",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("version_id", sa.Integer(), sa.ForeignKey("versions.id", ondelete="CASCADE"), nullable=False),
        sa.Column("module", sa.Text(), nullable=False),
        sa.Column("kind", sa.String(16), nullable=True),
        sa.Column("shape", sa.String(64), nullable=True),
        sa.Column("rank", sa.Integer(), nullable=True),
        sa.Column("rel_error", sa.Float(), nullable=True),
        sa.Column("energy", sa.Float(), nullable=True),
    )
    op.create_index("ix_layer_errors_version_id", "layer_errors", ["version_id"])

    op.create_table(
        "aliases",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("asset_id", sa.Integer(), sa.ForeignKey("assets.id", ondelete="CASCADE"), nullable=False),
        sa.Column("alias", sa.String(128), nullable=False),
        sa.Column("version_id", sa.Integer(), sa.ForeignKey("versions.id", ondelete="CASCADE"), nullable=False),
        sa.Column("updated_at", sa.Float(), nullable=False),
        sa.UniqueConstraint("asset_id", "alias", name="uq_aliases_asset_alias"),
    )
    op.create_index("ix_aliases_asset_id", "aliases", ["asset_id"])

    op.create_table(
        "tags",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("version_id", sa.Integer(), sa.ForeignKey("versions.id", ondelete="CASCADE"), nullable=False),
        sa.Column("key", sa.String(255), nullable=False),
        sa.Column("value", sa.Text(), nullable=False),
        sa.UniqueConstraint("version_id", "key", name="uq_tags_version_key"),
    )
    op.create_index("ix_tags_version_id", "tags", ["version_id"])

    op.create_table(
        "events",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("at", sa.Float(), nullable=False),
        sa.Column("action", sa.String(32), nullable=False),
        sa.Column("name", sa.String(128), nullable=True),
        sa.Column("number", sa.Integer(), nullable=True),
        sa.Column("sha256", sa.String(64), nullable=True),
        sa.Column("actor", sa.String(255), nullable=True),
        sa.Column("detail", sa.Text(), nullable=True),
    )
    op.create_index("ix_events_at", "events", ["at"])

    op.create_table(
        "file_hashes",
        sa.Column("path", sa.Text(), primary_key=True),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("mtime_ns", sa.BigInteger(), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("checked_at", sa.Float(), nullable=False),
    )


def downgrade() -> None:
    for table in ("file_hashes", "events", "tags", "aliases", "layer_errors", "lora_facts", "lineage",
                  "versions", "assets"):
        op.drop_table(table)
