"""Kept so that scripts written against the old path keep working: ``WorkspaceSettings`` moved to
:mod:`lbm_registry.settings` (a leaf every floor can reach, the CLI and the training launcher
included). New code imports it from there."""

from lbm_registry.settings import WorkspaceSettings

__all__ = ["WorkspaceSettings"]
