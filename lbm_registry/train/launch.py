"""``lbm-reg train --num-processes N``: N local data-parallel workers.

Why torch's elastic launcher, in process: it is what ``accelerate launch --multi_gpu`` and
``torchrun`` run underneath, so the workers see exactly the environment (``RANK``,
``WORLD_SIZE``, ``MASTER_ADDR``...) those give them, and a multi-node job started with
``accelerate launch`` or ``torchrun`` uses the same worker code (``lbm-reg train`` notices
``WORLD_SIZE`` and joins). Calling it in process (not through its command line) lets us turn a
failed worker into our one-line error instead of the launcher's report.

The caller (:func:`lbm_registry.api.train.train_lora`) picks and checks the run folder and the
config; the parent writes the resolved config; each worker runs the training function the caller
named (``entry``, ``"module:function"``: a name, since it crosses a process boundary, and so this
floor never imports the API above it), and rank 0 writes the summary the parent returns.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from lbm_registry.errors import LBMError, TrainingError
from lbm_registry.settings import WorkspaceSettings
from lbm_registry.train.config import TrainConfig

RESULT = "result.json"


def _free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launch_local(cfg: TrainConfig, *, settings: WorkspaceSettings, entry: str, resume: bool = False,
                 json_output: bool = False) -> dict[str, Any]:
    """Run ``cfg`` on ``cfg.num_processes`` local workers; return rank 0's summary.

    ``cfg`` comes checked, its ``output_dir`` the run folder; every worker calls ``entry``
    (``"module:function"``) as ``function(cfg, settings=, resume=, progress=, console=,
    err_console=)``."""
    import uuid

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    with tempfile.TemporaryDirectory(prefix="lbm-train-") as tmp:
        spec = Path(tmp) / "spec.json"
        spec.write_text(json.dumps({
            "config": cfg.to_dict(), "entry": entry, "resume": resume, "json": json_output, "home": str(settings.home),
            "catalog_url": settings.catalog_url, "tracking_uri": settings.tracking_uri, "dir": tmp}))
        launch = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=cfg.num_processes,
                              run_id=f"lbm-train-{uuid.uuid4().hex[:8]}", rdzv_backend="c10d",
                              rdzv_endpoint=f"127.0.0.1:{_free_port()}", max_restarts=0, monitor_interval=0.2)
        quiet = logging.getLogger("torch.distributed")
        level = quiet.level
        quiet.setLevel(logging.CRITICAL)  # a failed worker is reported below, in one line
        try:
            elastic_launch(launch, entrypoint=sys.executable)("-m", "lbm_registry.train.launch", str(spec))
        except ChildFailedError:
            if (Path(tmp) / "interrupted").exists() and not list(Path(tmp).glob("error-*.json")):
                raise KeyboardInterrupt from None
            raise _worker_error(Path(tmp)) from None
        except SignalException:  # Ctrl-C / SIGTERM: the workers were stopped (rank 0 saved a checkpoint)
            raise KeyboardInterrupt from None
        finally:
            quiet.setLevel(level)
        result = Path(tmp) / RESULT
        if not result.is_file():
            raise _worker_error(Path(tmp))
        return json.loads(result.read_text())


def _worker_error(folder: Path) -> LBMError:
    """The first worker's own error (by rank), as the same kind of error."""
    import lbm_registry.errors as errors

    for path in sorted(folder.glob("error-*.json"), key=lambda p: int(p.stem.split("-")[1])):
        data = json.loads(path.read_text())
        kind = getattr(errors, data.get("type", ""), None)
        if isinstance(kind, type) and issubclass(kind, LBMError):
            return kind(data["message"])
        return TrainingError(f"training worker {path.stem.split('-')[1]} failed: {data['message']}")
    if (folder / "interrupted").exists():
        return TrainingError("training interrupted")
    return TrainingError("a training worker died without a message (out of memory?)")


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def worker_main(spec_path: str) -> int:
    """One worker: train as the spec says; errors go to ``error-<rank>.json`` for the parent."""
    import signal

    spec = json.loads(Path(spec_path).read_text())
    folder = Path(spec["dir"])
    rank = int(os.environ.get("RANK", "0"))

    def _terminate(signum: int, frame: object) -> None:
        # Ctrl-C reaches every process, and the launcher then stops its workers with SIGINT or
        # SIGTERM: the first one interrupts (rank 0 saves a checkpoint), later ones must not
        # interrupt that save.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGINT, _terminate)
    try:
        import importlib

        from lbm_registry.console import console
        from lbm_registry.train.config import train_config_from_dict

        settings = WorkspaceSettings(home=Path(spec["home"]), catalog_url=spec["catalog_url"],
                                     tracking_uri=spec["tracking_uri"])
        cfg = train_config_from_dict(spec["config"], source="<worker>")
        module, _, function = spec["entry"].partition(":")
        train = getattr(importlib.import_module(module), function)
        out = train(cfg, settings=settings, resume=spec["resume"], progress=True,
                         console=console(stderr=spec["json"]), err_console=console(stderr=True))
        if rank == 0:
            _atomic_write(folder / RESULT, json.dumps(out))
        return 0
    except LBMError as exc:
        _atomic_write(folder / f"error-{rank}.json", json.dumps({"type": type(exc).__name__, "message": str(exc)}))
        return 2
    except KeyboardInterrupt:
        (folder / "interrupted").touch()
        return 130
    except Exception:
        if (folder / "interrupted").exists():  # a peer stopped mid-collective: part of the interrupt
            return 130
        raise


if __name__ == "__main__":  # pragma: no cover - run by the launcher
    sys.exit(worker_main(sys.argv[1]))
