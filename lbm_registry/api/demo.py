"""``lbm-reg demo``: the whole story on the tiny twin, offline, through the real CLI.

Every step below is an ordinary ``lbm-reg`` invocation (run in-process so torch is imported
once); the only step without a CLI verb is the brief *full* fine-tune that produces a real
"tuned" model to extract LoRAs from.
"""

from __future__ import annotations

import shlex
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from lbm_registry.errors import LBMError

MARKER = ".lbm-reg-demo"


def prepare_home(home: Path) -> None:
    """Start from an empty folder; only a folder an earlier demo made may be wiped."""
    if home.exists() and any(home.iterdir()):
        if not (home / MARKER).exists():
            raise LBMError(f"{home} is not empty and was not made by the demo; pick another --home")
        shutil.rmtree(home)
    home.mkdir(parents=True, exist_ok=True)
    (home / MARKER).write_text("made by lbm-reg demo; safe to delete\n")


def run_demo(home: Path, *, say: Callable[[str], None] = print, train_steps: int = 30,
             finetune_steps: int = 60) -> dict[str, float]:
    """Run the demo; returns the wall time of each step."""
    from lbm_registry.api.train import finetune_full
    from lbm_registry.cli.main import main as cli

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

    step("create the workspace", ["init"])
    step("create a seeded exact base (tiny twin)", ["base", "create", "--config", "lbm-tiny", "--seed", "0",
                                                   "--register", "tiny-base"])
    step("synthesize relighting shards (train)", ["data", "synth", "--output", str(data / "train"), "--n", "32",
                                                  "--resolution", "128", "--seed", "1"])
    step("synthesize relighting shards (validation)", ["data", "synth", "--output", str(data / "val"), "--n", "8",
                                                       "--resolution", "128", "--seed", "2"])
    train_shards = sorted(str(p) for p in (data / "train").glob("*.tar"))
    val_shards = sorted(str(p) for p in (data / "val").glob("*.tar"))

    say("\n[bold cyan]==> fine-tune the whole tiny model briefly (the 'real fine-tune' users bring)[/]")
    t0 = time.perf_counter()
    from lbm_registry.api.registry import resolve
    from lbm_registry.registry.settings import WorkspaceSettings

    base = resolve("tiny-base", WorkspaceSettings.resolve(home))
    tuned_path = finetune_full(base.path, train_shards=train_shards, steps=finetune_steps,
                               output=home / "tiny-relight-full.safetensors", seed=0)
    timings["full fine-tune"] = time.perf_counter() - t0
    step("register the fine-tuned model", ["import", str(tuned_path), "--name", "tiny-relight-full", "--kind", "model"])
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
                                                       "relight-small"])
    step("merge v1 and v2 half and half (exact)", ["merge", "relight@1:0.5", "relight@2:0.5", "--register",
                                                   "relight-avg"])
    step("export v1 for kohya tools", ["export", "relight@1", "--format", "kohya", "--output",
                                       str(out / "relight-kohya.safetensors")])
    step("import that kohya file back", ["import", str(out / "relight-kohya.safetensors"), "--kind", "lora",
                                         "--name", "relight-kohya", "--base", "tiny-base"])
    step("alias the trained version", ["alias", "set", "relight@3", "candidate"])
    step("everything in the registry", ["list"])
    step("lineage of the trained LoRA", ["lineage", "relight@candidate"])
    width = max(len(k) for k in timings)
    say("\n[bold]step times[/]\n" + "\n".join(f"  {k:<{width}}  {v:6.1f} s" for k, v in timings.items()))
    say(f"\n[bold green]demo complete[/] in {sum(timings.values()):.0f} s. Browse it in MLflow:\n"
        f"$ lbm-reg --home {shlex.quote(str(home))} ui")
    return timings


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
