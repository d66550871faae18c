"""Refresh the README's tour from a real ``lbm-reg demo`` run: ``python docs/readme_tour.py``.

The tour (between the ``<!-- tour:start -->`` and ``<!-- tour:end -->`` markers of README.md)
is a few steps of the demo's own output, abridged. Hashes, errors and timings change whenever
the pixels do (a new sampler detail, another init), so the tour is regenerated, never edited
by hand:

    python docs/readme_tour.py                  # runs the demo (80 columns) in a temp folder
    python docs/readme_tour.py --log demo.log   # or takes the output of a run you made
                                                #   (COLUMNS=80 lbm-reg demo --home demo-home > demo.log)

It also writes the demo's step times and total into the sentence that says how long the demo
takes (``<!-- demo-time -->`` marker), from the same run, with the load average around it.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"
#: (step title prefix, lines kept from its start, lines kept from its end; None = all)
STEPS = (("extract a fixed-rank LoRA", None, 0), ("validate v1", None, 0), ("compare the two LoRAs", 22, 10),
         ("serve:", None, 0), ("lineage of the trained LoRA", None, 0))


def run_demo(folder: Path) -> str:
    env = {**os.environ, "COLUMNS": "80", "MLFLOW_DISABLE_TELEMETRY": "true"}
    done = subprocess.run([sys.executable, "-m", "lbm_registry.cli.main", "demo", "--home", "demo-home"],
                          cwd=folder, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"the demo failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return done.stdout


def blocks(log: str) -> dict[str, list[str]]:
    """``==> title`` -> the lines of that step (title line included), progress lines dropped."""
    out: dict[str, list[str]] = {}
    for chunk in log.split("\n==> ")[1:]:
        lines = chunk.rstrip("\n").splitlines()
        title = lines[0]
        body = [x for x in lines[1:] if not re.match(r"^\s*\(.*: done in [\d.]+ s\)$", x)]
        out[title] = [f"==> {title}", *body]
    return out


def tour(log: str) -> str:
    found = blocks(log)
    parts = []
    for prefix, head, tail in STEPS:
        title = next((t for t in found if t.startswith(prefix)), None)
        if title is None:
            raise SystemExit(f"no step '{prefix}' in the demo output")
        lines = found[title]
        while lines and not lines[-1].strip():
            lines = lines[:-1]
        if head is not None and len(lines) > head + tail:
            lines = lines[:head] + ["..."] + (lines[-tail:] if tail else [])
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


def load_average() -> str:
    try:
        return open("/proc/loadavg").read().split()[0]
    except OSError:
        return "?"


def demo_time(log: str, load: str = "") -> str:
    m = re.search(r"demo complete in (\d+) s", log)
    total = int(m.group(1)) if m else 0
    steps = dict(re.findall(r"^  (.+?)\s{2,}([\d.]+) s$", log, re.M))
    longest = max(steps.items(), key=lambda kv: float(kv[1])) if steps else ("?", "0")
    minutes = round(total / 60)
    about = "about a minute" if minutes <= 1 else f"about {minutes} minutes"
    return (f"{about} ({total} s; the longest step, {longest[0]}, "
            f"{float(longest[1]):.0f} s{'; ' + load if load else ''})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--log", type=Path, help="output of a demo run (default: run one now)")
    ap.add_argument("--load", default="", help="with --log: the load average the run had, to print beside it")
    args = ap.parse_args()
    load = f"load average {args.load}" if args.load else ""
    if args.log:
        log = args.log.read_text()
    else:
        before = load_average()
        with tempfile.TemporaryDirectory() as tmp:
            log = run_demo(Path(tmp))
        load = f"load average {before} before, {load_average()} after"
    log = re.sub(r"/\S*?/demo-home", "demo-home", log)   # absolute paths as the README shows them
    text = README.read_text()
    text = re.sub(r"(<!-- tour:start -->\n```text\n).*?(\n```\n<!-- tour:end -->)",
                  lambda m: m.group(1) + tour(log) + m.group(2), text, flags=re.S)
    text = re.sub(r"(<!-- demo-time -->).*?(<!-- /demo-time -->)", lambda m: m.group(1) + demo_time(log, load) + m.group(2),
                  text, flags=re.S)
    README.write_text(text)
    print(f"README tour refreshed ({len(log.splitlines())} lines of demo output)")


if __name__ == "__main__":
    main()
