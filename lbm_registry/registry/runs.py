"""MLflow run logging for training, `infer --log` and `compare --report` (params, metrics, images).

Why a thin wrapper: MLflow costs ~1.3 s to import and training must also run without it
(``mlflow: false``, tests). :class:`NullTracker` and :class:`MLflowTracker` share one small
interface. The tracker uses an explicit ``MlflowClient`` (no global ``mlflow.set_tracking_uri``)
on the URI it is given (the API passes ``WorkspaceSettings.effective_tracking_uri``); creating a
new SQLite MLflow DB is done under the workspace's ``.locks/mlflow.lock`` as the registry does,
because concurrent creation crashes. Metrics are buffered and flushed in batches so a SQLite
backend sees a handful of writes per validation, not one per step. A failure mid-run warns once
and stops logging; it never stops training.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from lbm_registry.errors import RegistryError


class NullTracker:
    """Logs nothing."""

    run_id: str | None = None
    warn: Callable[[str], None] = staticmethod(lambda msg: None)

    def log_params(self, params: Mapping[str, Any]) -> None:
        pass

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        pass

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        pass

    def flush(self) -> None:
        pass

    def end(self, status: str = "FINISHED") -> None:
        pass


class MLflowTracker(NullTracker):
    """One MLflow run in ``experiment`` of the workspace's tracking store."""

    def __init__(self, tracking_uri: str, experiment: str, *, home: Path | None = None, run_name: str | None = None,
                 tags: Mapping[str, str] | None = None, warn: Callable[[str], None] | None = None) -> None:
        """``home``: the workspace folder (its ``.locks/`` and ``artifacts/`` are used for SQLite)."""
        from lbm_registry.registry.db import mask_url
        from lbm_registry.registry.tracking import check_reachable, mlflow_environment

        mlflow_environment()
        self.warn = warn or (lambda msg: None)
        self.uri = tracking_uri
        self._buffer: list[Any] = []
        self._broken = False
        self._ended = False
        is_sqlite = self.uri.startswith("sqlite:")
        try:
            check_reachable(self.uri)
            from mlflow import MlflowClient
            from mlflow.exceptions import MlflowException

            for name in ("mlflow", "alembic"):
                logging.getLogger(name).setLevel(logging.WARNING)
            from filelock import FileLock

            lock: Any = contextlib.nullcontext()
            if is_sqlite and home is not None:
                (home / ".locks").mkdir(parents=True, exist_ok=True)
                lock = FileLock(str(home / ".locks" / "mlflow.lock"), timeout=300)
            with lock:
                self.client = MlflowClient(tracking_uri=self.uri)
                exp = self.client.get_experiment_by_name(experiment)
                if exp is None:
                    location = (home / "artifacts").as_uri() if is_sqlite and home is not None else None
                    try:
                        exp_id = self.client.create_experiment(experiment, artifact_location=location)
                    except MlflowException as exc:  # a server: another process created it first
                        if getattr(exc, "error_code", "") != "RESOURCE_ALREADY_EXISTS":
                            raise
                        exp_id = self.client.get_experiment_by_name(experiment).experiment_id
                else:
                    exp_id = exp.experiment_id
            from lbm_registry.registry.tracking import tidy_experiments

            tidy_experiments(self.client, home if is_sqlite else None, self.uri, names=(experiment,),
                             lock=lambda: (FileLock(str(home / ".locks" / "mlflow-write.lock"), timeout=300)
                                           if is_sqlite and home is not None else contextlib.nullcontext()))
            self.run_id = self.client.create_run(exp_id, run_name=run_name, tags=dict(tags or {})).info.run_id
        except Exception as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
            raise RegistryError(f"cannot start an MLflow run at {mask_url(self.uri)}: {first} "
                                "(set mlflow: false to train without tracking)") from None

    def _guard(self, what: str, fn: Callable[[], Any]) -> None:
        if self._broken:
            return
        try:
            fn()
        except Exception as exc:
            self._broken = True
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            self.warn(f"MLflow {what} failed ({first}); training continues without tracking")

    def log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(str(k), str(v)[:6000]) for k, v in params.items()]
        self._guard("log_params", lambda: self.client.log_batch(self.run_id, params=items))

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        import time

        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        self._buffer.extend(Metric(k, float(v), ts, step) for k, v in metrics.items())
        if len(self._buffer) >= 500:
            self.flush()

    def flush(self) -> None:
        if not self._buffer:
            return
        batch, self._buffer = self._buffer, []
        self._guard("log_metrics", lambda: self.client.log_batch(self.run_id, metrics=batch))

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self._guard("log_artifact", lambda: self.client.log_artifact(self.run_id, str(path), artifact_path))

    def end(self, status: str = "FINISHED") -> None:
        """Idempotent: the first status wins."""
        if self._ended:
            return
        self._ended = True
        self.flush()
        self._guard("set_terminated", lambda: self.client.set_terminated(self.run_id, status))


def make_tracker(enabled: bool, tracking_uri: str | None, experiment: str, *, home: Path | None = None,
                 run_name: str | None = None, tags: Mapping[str, str] | None = None,
                 warn: Callable[[str], None] | None = None) -> NullTracker:
    """An :class:`MLflowTracker` when ``enabled`` (and a URI is given), else a :class:`NullTracker`."""
    if not enabled or not tracking_uri:
        return NullTracker()
    return MLflowTracker(tracking_uri, experiment, home=home, run_name=run_name, tags=tags, warn=warn)
