"""SQLAlchemy 2 declarative models of the catalog: the declared schema.

Why they exist when the catalog code speaks plain SQL: the tables are *created and upgraded*
only by the Alembic scripts in ``registry/migrations/`` (whose ``env.py`` uses this metadata as
``target_metadata``), and a test checks that migrating an empty database yields exactly these
models. The hot read path (``lbm-reg list/show``) does not import this module: importing
SQLAlchemy alone costs ~0.45 s, more than half the latency budget of those commands (see
:mod:`lbm_registry.registry.db`).

Times are UNIX seconds (floats) and JSON documents are TEXT, so the same SQL runs unchanged on
SQLite and PostgreSQL.
"""

from __future__ import annotations

from sqlalchemy import BigInteger, Float, ForeignKey, Index, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    pass


class Asset(Base):
    """A named, kinded series of versions (``relight``, kind ``lora``)."""

    __tablename__ = "assets"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    kind: Mapped[str] = mapped_column(String(16))  # base | model | lora
    created_at: Mapped[float] = mapped_column(Float)


class Version(Base):
    """One registered file. Only ``status == 'ready'`` rows are visible to references."""

    __tablename__ = "versions"
    __table_args__ = (UniqueConstraint("asset_id", "number", name="uq_versions_asset_number"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    asset_id: Mapped[int] = mapped_column(ForeignKey("assets.id", ondelete="CASCADE"), index=True)
    number: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(16), index=True)  # pending | ready | failed
    sha256: Mapped[str] = mapped_column(String(64), index=True)
    size: Mapped[int] = mapped_column(BigInteger)
    dtype: Mapped[str | None] = mapped_column(String(16))
    blob_path: Mapped[str] = mapped_column(Text)  # relative to the workspace home
    file_name: Mapped[str | None] = mapped_column(Text)
    mlflow_run_id: Mapped[str | None] = mapped_column(String(64))
    mlflow_version: Mapped[str | None] = mapped_column(String(32))
    created_at: Mapped[float] = mapped_column(Float)
    tool_version: Mapped[str] = mapped_column(String(32))
    config_json: Mapped[str | None] = mapped_column(Text)
    facts_json: Mapped[str] = mapped_column(Text, default="{}")
    params_json: Mapped[str] = mapped_column(Text, default="{}")
    metrics_json: Mapped[str] = mapped_column(Text, default="{}")
    owner: Mapped[str | None] = mapped_column(String(255))  # host:pid of the registering process
    integrity: Mapped[str] = mapped_column(String(16), default="ok")  # ok | missing | corrupt
    error: Mapped[str | None] = mapped_column(Text)


class LineageEdge(Base):
    """``version`` was made from ``target`` in ``role`` (base, tuned, parent, dataset).

    ``sha256`` is always recorded; ``target_version_id`` only when that hash is a registered
    version (an unregistered base file or a dataset shard has none).
    """

    __tablename__ = "lineage"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    version_id: Mapped[int] = mapped_column(ForeignKey("versions.id", ondelete="CASCADE"), index=True)
    role: Mapped[str] = mapped_column(String(16))
    target_version_id: Mapped[int | None] = mapped_column(
        ForeignKey("versions.id", ondelete="SET NULL"), index=True)
    sha256: Mapped[str | None] = mapped_column(String(64), index=True)
    ref: Mapped[str | None] = mapped_column(Text)
    path: Mapped[str | None] = mapped_column(Text)


class LoRAFacts(Base):
    """Summary facts of a LoRA version, as columns so they can be filtered and sorted."""

    __tablename__ = "lora_facts"

    version_id: Mapped[int] = mapped_column(ForeignKey("versions.id", ondelete="CASCADE"), primary_key=True)
    rank: Mapped[int | None] = mapped_column(Integer)
    conv_rank: Mapped[int | None] = mapped_column(Integer)
    policy: Mapped[str | None] = mapped_column(Text)
    alpha: Mapped[float | None] = mapped_column(Float)
    file_size: Mapped[int | None] = mapped_column(BigInteger)
    mean_error: Mapped[float | None] = mapped_column(Float)
    max_error: Mapped[float | None] = mapped_column(Float)
    functional_error: Mapped[float | None] = mapped_column(Float)
    n_layers: Mapped[int | None] = mapped_column(Integer)
    n_skipped: Mapped[int | None] = mapped_column(Integer)


class LayerError(Base):
    """Per-layer rank and reconstruction error of a LoRA version (792 rows for a full LBM)."""

    __tablename__ = "layer_errors"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    version_id: Mapped[int] = mapped_column(ForeignKey("versions.id", ondelete="CASCADE"), index=True)
    module: Mapped[str] = mapped_column(Text)
    kind: Mapped[str | None] = mapped_column(String(16))
    shape: Mapped[str | None] = mapped_column(String(64))
    rank: Mapped[int | None] = mapped_column(Integer)
    rel_error: Mapped[float | None] = mapped_column(Float)
    energy: Mapped[float | None] = mapped_column(Float)


class Alias(Base):
    """A movable name (``prod``) for one version of an asset."""

    __tablename__ = "aliases"
    __table_args__ = (UniqueConstraint("asset_id", "alias", name="uq_aliases_asset_alias"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    asset_id: Mapped[int] = mapped_column(ForeignKey("assets.id", ondelete="CASCADE"), index=True)
    alias: Mapped[str] = mapped_column(String(128))
    version_id: Mapped[int] = mapped_column(ForeignKey("versions.id", ondelete="CASCADE"))
    updated_at: Mapped[float] = mapped_column(Float)


class Tag(Base):
    """Free-form key/value tags of a version (mirrored to MLflow)."""

    __tablename__ = "tags"
    __table_args__ = (UniqueConstraint("version_id", "key", name="uq_tags_version_key"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    version_id: Mapped[int] = mapped_column(ForeignKey("versions.id", ondelete="CASCADE"), index=True)
    key: Mapped[str] = mapped_column(String(255))
    value: Mapped[str] = mapped_column(Text)


class Event(Base):
    """Append-only audit log. No foreign keys: entries outlive the versions they mention."""

    __tablename__ = "events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[float] = mapped_column(Float, index=True)
    action: Mapped[str] = mapped_column(String(32))
    name: Mapped[str | None] = mapped_column(String(128))
    number: Mapped[int | None] = mapped_column(Integer)
    sha256: Mapped[str | None] = mapped_column(String(64))
    actor: Mapped[str | None] = mapped_column(String(255))
    detail: Mapped[str | None] = mapped_column(Text)


class FileHash(Base):
    """Hash cache for unregistered files keyed by (absolute path, size, mtime_ns): a repeat
    ``--base ./big.safetensors`` does not re-read 5 GB."""

    __tablename__ = "file_hashes"

    path: Mapped[str] = mapped_column(Text, primary_key=True)
    size: Mapped[int] = mapped_column(BigInteger)
    mtime_ns: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    checked_at: Mapped[float] = mapped_column(Float)


class RegistryInfo(Base):
    """Facts about the catalog itself: ``catalog_id`` (a UUID set by migration 0002), tagged on
    every MLflow run/model version it mirrors so registries sharing a tracking server keep apart."""

    __tablename__ = "registry_info"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text)


Index("ix_versions_asset_status", Version.asset_id, Version.status)
