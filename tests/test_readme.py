"""The README's ``lbm-reg serve`` example, run as written: its serve command as a real process,
each of its curl lines with real curl (and jq, base64) in bash, the variables it uses set.

The one change: the port. The README serves on 8080; the test gives ``--port`` a free one and
puts it in the URLs, so it cannot collide with anything else on the machine.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def serve_block() -> list[str]:
    """The commands of the README's first bash block under "Serving", continuation lines joined,
    comment lines dropped."""
    text = README.read_text()
    section = text[text.index("### Serving: `lbm-reg serve`"):]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    joined = re.sub(r"\\\n\s*", "", block)
    return [line for line in joined.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def _readme_registry(home: Path, base_path: Path, config: dict) -> None:
    """The names the example uses: lbm-base@1; relight@1..4 (prod -> 3); warm@1..2."""
    from fixtures.serve import write_random_lora

    from lbm_registry.api.registry import register_asset, set_alias
    from lbm_registry.settings import WorkspaceSettings

    s = WorkspaceSettings(home=home)
    base = register_asset(base_path, name="lbm-base", kind="base", settings=s, config=config)
    facts = {"rank": 2, "conv_rank": 2, "policy": "fixed", "alpha": 2.0}
    for i, name in enumerate(["relight"] * 4 + ["warm"] * 2):
        path = write_random_lora(base_path, home.parent / f"{name}-{i}.safetensors", seed=100 + i, rank=2,
                                 conv_rank=2)
        register_asset(path, name=name, kind="lora", settings=s, facts=facts, lineage={"base": base})
    set_alias("relight@3", "prod", s)


@pytest.mark.slow   # a real `lbm-reg serve` process: ~20 s; the body rule itself is tested by default in test_serve.py
@pytest.mark.skipif(not all(shutil.which(t) for t in ("curl", "jq", "base64", "bash")),
                    reason="the README's serve example needs curl, jq, base64 and bash")
def test_readme_serve_example_runs_as_written(tmp_path, tiny_base_path, tiny_config, mlflow_template):
    """The README's curl lines used ``curl -d`` (form-urlencoded): every one got 400."""
    from fixtures.servers import _stop, free_port
    from PIL import Image

    lines = serve_block()
    serve_line, rest = lines[0], lines[1:]
    assert serve_line.startswith("lbm-reg --home reg serve "), serve_line
    assigns = [x for x in rest if re.match(r"^[A-Z]+=", x)]
    commands = [x for x in rest if x not in assigns]
    assert len(commands) >= 6 and all(c.startswith("curl ") for c in commands), commands

    (tmp_path / "reg").mkdir()
    shutil.copyfile(mlflow_template, tmp_path / "reg" / "mlflow.db")
    _readme_registry(tmp_path / "reg", tiny_base_path, tiny_config.to_dict())
    Image.new("RGB", (90, 70), (180, 120, 60)).save(tmp_path / "photo.jpg")
    port = free_port()
    env = {**os.environ, "SERVE_TOKEN": "readme-token", "MLFLOW_DISABLE_TELEMETRY": "true",
           "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])}
    log = tmp_path / "serve.log"
    with open(log, "w") as fh:
        proc = subprocess.Popen(["bash", "-c", f"exec {serve_line} --port {port}"], cwd=tmp_path,
                                env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 180
        while f"127.0.0.1:{port}" not in log.read_text():
            assert proc.poll() is None and time.time() < deadline, log.read_text()[-2000:]
            time.sleep(0.2)

        def run(command: str) -> str:
            script = "\n".join(assigns + [command.replace("127.0.0.1:8080", f"127.0.0.1:{port}")])
            done = subprocess.run(["bash", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                                  timeout=300)
            assert done.returncode == 0, (command, done.stderr)
            return done.stdout

        outputs = [run(c) for c in commands]
        if not (tmp_path / "out.png").read_bytes().startswith(b"\x89PNG"):   # say what the server answered
            pytest.fail(f"{commands[0]}: {run(commands[0].split(' | ')[0])[:500]}")
        with Image.open(tmp_path / "out.png") as out:          # curl ... | jq -r .image | base64 -d > out.png
            assert out.format == "PNG" and out.size == (90, 70)
        stacked = json.loads((tmp_path / "stacked.json").read_text())
        assert [x["ref"] for x in stacked["loras"]] == ["relight@3", "warm@2"], stacked
        assert stacked["loras"][1]["scale"] == 0.5
        listing, loaded, unloaded, health = (json.loads(o) for o in outputs[2:6])
        assert [(e["ref"], e["pinned"]) for e in listing["loras"] if e["ref"] == "relight@3"] == [("relight@3", True)]
        assert loaded["ref"] == "relight@4" and loaded["pinned"] is True
        assert unloaded["unloaded"] == "relight@4"
        assert health["status"] == "ok" and health["base"] == "lbm-base@1"
        assert 'lbm_serve_requests_total{outcome="ok"} 2' in outputs[6]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0, log.read_text()[-2000:]
        assert "Traceback" not in log.read_text()
    finally:
        _stop(proc, signal.SIGKILL)   # only if an assertion left it running
