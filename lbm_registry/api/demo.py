"""``lbm-reg demo``: the whole story on the tiny twin, offline, through the real CLI.

Every step below is an ordinary ``lbm-reg`` invocation, made through the ``cli`` callable the
caller passes (``lbm-reg demo`` passes its own ``main``, so the steps run in process and torch is
imported once; the API never imports the CLI above it). The only step without a CLI verb is the
brief *full* fine-tune that produces a real "tuned" model to extract LoRAs from.
"""

from __future__ import annotations

import shlex
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from lbm_registry.errors import LBMError

MARKER = ".lbm-reg-demo"
#: Registrations that would draw their probe picture in the background wait for it here: the
#: demo's MLflow pages are complete when it ends, and its steps do not share 2 cores with probes.
WAIT = ("--probe", "wait")


def prepare_home(home: Path) -> None:
    """Start from an empty folder; only a folder an earlier demo made may be wiped."""
    if home.exists() and any(home.iterdir()):
        if not (home / MARKER).exists():
            raise LBMError(f"{home} is not empty and was not made by the demo; pick another --home")
        shutil.rmtree(home)
    home.mkdir(parents=True, exist_ok=True)
    (home / MARKER).write_text("made by lbm-reg demo; safe to delete\n")


def run_demo(home: Path, *, cli: Callable[[list[str]], object], say: Callable[[str], None] = print,
             train_steps: int = 30, finetune_steps: int = 60) -> dict[str, float]:
    """Run the demo; returns the wall time of each step.

    ``cli(args)`` runs one ``lbm-reg`` command line as a user would (``lbm_registry.cli.main.main``:
    it exits through ``SystemExit``; a non-zero code stops the demo)."""
    from lbm_registry.api.train import finetune_full

    home = home.absolute()
    prepare_home(home)
    data, out = home / "data", home / "outputs"
    timings: dict[str, float] = {}

    def step(title: str, args: list[str]) -> None:
        say(f"\n[bold cyan]==> {title}[/]\n$ lbm-reg {shlex.join(args)}")
        t0 = time.perf_counter()
        try:
            cli(["--home", str(home), *args])
        except SystemExit as exc:
            if exc.code not in (0, None):
                raise LBMError(f"demo step failed: lbm-reg {shlex.join(args)} (exit {exc.code})") from None
        timings[title] = time.perf_counter() - t0
        say(f"[dim]  ({title}: done in {timings[title]:.1f} s)[/]")

    step("create the workspace", ["init"])
    step("create a seeded exact base (tiny twin)", ["base", "create", "--config", "lbm-tiny", "--seed", "0",
                                                   "--register", "tiny-base"])
    step("synthesize relighting shards (train)", ["data", "synth", "--output", str(data / "train"), "--n", "32",
                                                  "--resolution", "128", "--seed", "1"])
    step("synthesize relighting shards (validation)", ["data", "synth", "--output", str(data / "val"), "--n", "8",
                                                       "--resolution", "128", "--seed", "2"])
    train_shards = sorted(str(p) for p in (data / "train").glob("*.tar"))
    val_shards = sorted(str(p) for p in (data / "val").glob("*.tar"))

    # No CLI verb makes a full fine-tune (users bring theirs): the Python call, with a line of
    # progress every tenth of the way, so this longest step never looks hung.
    tuned_out = home / "tiny-relight-full.safetensors"
    say("\n[bold cyan]==> fine-tune the whole tiny model briefly (the 'real fine-tune' users bring)[/]\n"
        f"$ python -c 'from lbm_registry.api.train import finetune_full; finetune_full(\"<tiny-base blob>\", "
        f"train_shards={[Path(p).name for p in train_shards]}, steps={finetune_steps}, output=\"{tuned_out.name}\")'")
    t0 = time.perf_counter()
    from lbm_registry.api.registry import resolve
    from lbm_registry.settings import WorkspaceSettings

    every = max(1, finetune_steps // 10)

    def progress(done: int, total: int, loss: float) -> None:
        if done == 1 or done % every == 0 or done == total:
            spent = time.perf_counter() - t0
            left = spent / done * (total - done)
            say(f"  full fine-tune: step {done}/{total}, loss {loss:.4f}, {spent / done:.2f} s/step, "
                f"about {left:.0f} s left")

    base = resolve("tiny-base", WorkspaceSettings.resolve(home))
    tuned_path = finetune_full(base.path, train_shards=train_shards, steps=finetune_steps, output=tuned_out, seed=0,
                               progress=progress)
    timings["full fine-tune"] = time.perf_counter() - t0
    step("register the fine-tuned model", ["import", str(tuned_path), "--name", "tiny-relight-full", "--kind", "model",
                                           "--base", "tiny-base", *WAIT])
    tuned_path.unlink()

    step("extract a fixed-rank LoRA", ["extract", "--base", "tiny-base", "--tuned", "tiny-relight-full",
                                      "--rank", "16", "--conv-rank", "8", "--register", "relight"])
    step("extract a budget-policy LoRA into the same name", ["extract", "--base", "tiny-base", "--tuned",
                                                            "tiny-relight-full", "--budget", "2MB",
                                                            "--register", "relight"])
    step("validate v1 (base/tuned from the lineage)", ["validate", "relight@1", "--layers-file",
                                                      str(home / "relight-v1-layers.txt")])
    step("validate v2", ["validate", "relight@2"])
    sample = sorted((data / "val").glob("*.tar"))
    src = out / "source.png"
    _first_source_image(sample[0], src)
    step("infer with the latest LoRA", ["infer", "relight@latest", "--source", str(src), "--output",
                                       str(out / "relight-latest.png"), "--scale", "1.0", "--device", "cpu"])
    step("compare the two LoRAs", ["compare", "relight@1", "v2", "--source", str(src), "--report",
                                  str(home / "report"), "--device", "cpu"])
    step("fine-tune v1 further on the shards (new version with a parent)", [
        "train", "--config", "lora-finetune", "--base", "tiny-base", "--lora", "relight@1",
        *_repeat("--train-shards", train_shards), *_repeat("--validation-shards", val_shards),
        "--trainable-lora-modules", "*attn*", "--max-steps", str(train_steps), "--resolution", "128",
        "--register", "relight"])
    step("resize v1 to rank 4 from its factors alone", ["resize", "relight@1", "--rank", "4", "--register",
                                                       "relight-small", *WAIT])
    step("merge v1 and v2 half and half (exact)", ["merge", "relight@1:0.5", "relight@2:0.5", "--register",
                                                   "relight-avg", *WAIT])
    step("export v1 for kohya tools", ["export", "relight@1", "--format", "kohya", "--output",
                                       str(out / "relight-kohya.safetensors")])
    step("import that kohya file back", ["import", str(out / "relight-kohya.safetensors"), "--kind", "lora",
                                         "--name", "relight-kohya", "--base", "tiny-base", *WAIT])
    step("alias the trained version", ["alias", "set", "relight@3", "candidate"])
    say("\n[bold cyan]==> serve: one warm base; four requests at once, for three LoRAs and for none[/]\n"
        "$ lbm-reg serve --base tiny-base   # (in a thread here, on a free port of 127.0.0.1)")
    t0 = time.perf_counter()
    for line in serve_requests(home, src, ["relight@1", "relight@2", "relight@candidate", None]):
        say(f"  {line}")
    timings["serve a mixed-LoRA batch"] = time.perf_counter() - t0
    step("everything in the registry", ["list"])
    step("lineage of the trained LoRA", ["lineage", "relight@candidate"])
    width = max(len(k) for k in timings)
    say("\n[bold]step times[/]\n" + "\n".join(f"  {k:<{width}}  {v:6.1f} s" for k, v in timings.items()))
    say(f"\n[bold green]demo complete[/] in {sum(timings.values()):.0f} s. Browse it in MLflow:\n"
        f"$ {lbm_reg_command()} --home {shlex.quote(str(home))} ui")
    return timings


def lbm_reg_command() -> str:
    """How to run ``lbm-reg`` from here: its name when that is on PATH, else its path
    (``make demo`` runs ``.venv/bin/lbm-reg`` without activating the venv)."""
    import os
    import sys

    ours = Path(sys.executable).with_name("lbm-reg")
    on_path = shutil.which("lbm-reg")
    if on_path and (not ours.is_file() or Path(on_path).resolve() == ours.resolve()):
        return "lbm-reg"
    if ours.is_file():
        rel = os.path.relpath(ours, Path.cwd())
        return shlex.quote(rel if not rel.startswith("..") else str(ours))
    return f"{shlex.quote(sys.executable)} -m lbm_registry.cli.main"


def serve_requests(home: Path, image: Path, refs: list[str | None]) -> list[str]:
    """Start the real HTTP server (``lbm-reg serve``'s app under uvicorn) on a free port of
    127.0.0.1, POST one ``/v1/images`` request per reference at once, stop it; one line per answer.

    The batcher waits a moment for company, so the requests share one denoiser pass: each answer
    says the size of the batch it ran in."""
    import base64
    import json
    import socket
    import threading
    import urllib.request
    from concurrent.futures import ThreadPoolExecutor

    import uvicorn

    from lbm_registry.api.serve import Server
    from lbm_registry.serve.app import create_app
    from lbm_registry.settings import WorkspaceSettings

    engine = Server("tiny-base", preload=[r for r in refs if r], settings=WorkspaceSettings.resolve(home),
                    device="cpu", max_batch=8, max_wait_ms=500)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(engine, close_engine=False), host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        while not server.started:
            if not thread.is_alive():
                raise LBMError(f"the demo server did not start on 127.0.0.1:{port}")
            time.sleep(0.05)
        payload = base64.b64encode(image.read_bytes()).decode("ascii")

        def post(ref: str | None) -> dict:
            body = json.dumps({"image": payload, "lora": ref, "scale": 0.5 if ref and "@candidate" in ref else 1.0})
            req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/images", data=body.encode(),
                                         headers={"Content-Type": "application/json"}, method="POST")
            with urllib.request.urlopen(req, timeout=120) as r:
                return json.loads(r.read())

        with ThreadPoolExecutor(len(refs)) as pool:
            answers = list(pool.map(post, refs))
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        engine.close()
    return [f"{ref or '(no LoRA)':<20} -> {a['width']}x{a['height']} PNG, batch of {a['batch_size']}, {a['ms']:.0f} ms"
            for ref, a in zip(refs, answers, strict=True)]


def _repeat(flag: str, values: list[str]) -> list[str]:
    return [x for v in values for x in (flag, v)]


def _first_source_image(shard: Path, dest: Path) -> None:
    """Pull the first source image out of a webdataset shard (plain tarfile read)."""
    import tarfile

    from lbm_registry.lbm.imaging import open_image

    dest.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(shard) as tar:
        for member in tar:
            if member.name.endswith(".source.jpg") or ".source." in member.name:
                data = tar.extractfile(member).read()
                open_image(data).save(dest)
                return
    raise LBMError(f"{shard}: no source image found")
