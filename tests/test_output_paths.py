"""Where outputs may go (issue 22 items 1 and 2): every command that writes a file or folder the
user names refuses, in one line and before any work, a device, FIFO or socket (outputs are regular
files), a dangling symlink, and any path inside a registry's own files (catalog, MLflow store and
their SQLite side files, blobs, locks, MLflow artifacts). A symlink to a file is written through,
as ``cp`` does. The last gate is ``fileio.atomic_path``, which every writer goes through."""

from __future__ import annotations

import os
import socket
import stat
from pathlib import Path

import pytest
from fixtures.storage import snapshot

from lbm_registry.errors import ConfigError


def _managed_targets(home: Path) -> dict[str, Path]:
    blob = next(p for p in (home / "blobs" / "sha256").rglob("*") if p.is_file())
    run = next(p for p in (home / "artifacts").iterdir() if p.is_dir())
    return {"catalog": home / "catalog.db", "catalog-wal": home / "catalog.db-wal",
            "mlflow": home / "mlflow.db", "mlflow-journal": home / "mlflow.db-journal", "blob": blob,
            "new-blob": home / "blobs" / "sha256" / "ab" / "new.safetensors", "lock": home / ".locks" / "catalog.lock",
            "artifacts": run / "artifacts" / "weights" / "x.safetensors"}


def _writers(reg: dict, tmp: Path, tiny_base_path: Path, tiny_config_path: Path) -> dict[str, callable]:
    """command -> (target path -> argv): every command that writes a path the user names."""
    src = tmp / "src.png"
    if not src.exists():
        from PIL import Image

        Image.new("RGB", (32, 32)).save(src)
    lora = str(reg["lora"])
    return {
        "export kohya": lambda p: ["export", "st-lora", "--format", "kohya", "--output", p],
        "export peft": lambda p: ["export", "st-lora", "--format", "peft", "--output", p],
        "extract": lambda p: ["extract", "--base", "st-base", "--tuned", str(tiny_base_path), "--output", p],
        "resize": lambda p: ["resize", lora, "--rank", "1", "--output", p],
        "merge": lambda p: ["merge", lora, "st-lora@1", "--output", p],
        "base create": lambda p: ["base", "create", "--config", str(tiny_config_path), "--output", p],
        "infer": lambda p: ["infer", "st-lora", "--source", str(src), "--output", p],
        "validate": lambda p: ["validate", "st-lora", "--layers-file", p],
        "compare": lambda p: ["compare", "st-lora@1", lora, "--report", p],
        "data synth": lambda p: ["data", "synth", "--output", p, "--n", "1"],
        "train": lambda p: ["train", "--config", "lora-finetune", "--base", "st-base", "--lora", "st-lora",
                            "--output-dir", p],
    }


COMMANDS = ("export kohya", "export peft", "extract", "resize", "merge", "base create", "infer", "validate",
            "compare", "data synth", "train")


@pytest.mark.parametrize("command", COMMANDS)
def test_no_command_writes_into_a_registry(edge_registry, cli, tmp_path, tiny_base_path, tiny_config_path, command):
    home = edge_registry["home"]
    targets = _managed_targets(home)
    make = _writers(edge_registry, tmp_path, tiny_base_path, tiny_config_path)[command]
    before = snapshot(home)
    # each command against two of the managed places (all of them: the export test below and the fuzz suite)
    picks = list(targets.values())
    i = COMMANDS.index(command)
    chosen = [picks[i % len(picks)], picks[(i + 3) % len(picks)]]
    if command == "infer":  # an image name (a .db is no image format: refused for that alone)
        chosen = [home / "blobs" / "sha256" / "ab" / "out.png", home / "artifacts" / "out.png"]
    for target in chosen:
        rc, out, err = cli("--home", home, *make(str(target)))
        assert rc == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, (command, target, err)
        assert "is inside the registry at" in err and str(home) in err, (command, err)
    assert snapshot(home) == before
    assert cli("--home", home, "list")[0] == 0


def test_export_refuses_every_managed_file_and_the_registry_still_works(edge_registry, cli):
    home = edge_registry["home"]
    before = snapshot(home)
    for name, target in _managed_targets(home).items():
        for fmt in ("kohya", "peft"):
            rc, _, err = cli("--home", home, "export", "st-lora", "--format", fmt, "--output", target)
            assert rc == 2 and "is inside the registry" in err, (name, fmt, err)
    assert snapshot(home) == before
    rc, out, _ = cli("--home", home, "show", "st-lora", "--json")
    assert rc == 0 and '"st-lora"' in out


def _special_files(tmp_path: Path) -> dict[str, Path]:
    fifo = tmp_path / "fifo.safetensors"
    os.mkfifo(fifo)
    sock = tmp_path / "sock.safetensors"
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(sock))
    server.close()
    out = {"FIFO": fifo, "socket": sock}
    if os.geteuid() == 0:  # a character device node of our own (a /dev/null twin), never /dev itself
        dev = tmp_path / "dev.safetensors"
        os.mknod(dev, stat.S_IFCHR | 0o600, os.makedev(1, 3))
        out["character device"] = dev
    return out


@pytest.mark.parametrize("command", ["export kohya", "extract", "resize", "base create", "validate"])
def test_devices_fifos_and_sockets_are_never_replaced(edge_registry, cli, tmp_path, tiny_base_path,
                                                      tiny_config_path, command):
    make = _writers(edge_registry, tmp_path, tiny_base_path, tiny_config_path)[command]
    for kind, node in _special_files(tmp_path).items():
        mode = node.lstat().st_mode
        rc, _, err = cli("--home", edge_registry["home"], *make(str(node)))
        assert rc == 2 and len(err.strip().splitlines()) == 1 and f"is a {kind}" in err, (kind, err)
        assert node.lstat().st_mode == mode   # still the same node, not a regular file


def test_infer_refuses_a_fifo_as_an_output_image(edge_registry, cli, tmp_path):
    from PIL import Image

    src = tmp_path / "a.png"
    Image.new("RGB", (32, 32)).save(src)
    fifo = tmp_path / "out.png"
    os.mkfifo(fifo)
    rc, _, err = cli("--home", edge_registry["home"], "infer", "st-lora", "--source", src, "--output", fifo)
    assert rc == 2 and "is a FIFO" in err and stat.S_ISFIFO(fifo.lstat().st_mode), err


def test_a_symlink_output_is_written_through_as_cp_does(edge_registry, cli, tmp_path):
    home = edge_registry["home"]
    direct = tmp_path / "direct.safetensors"
    assert cli("--home", home, "export", "st-lora", "--format", "kohya", "--output", direct)[0] == 0
    target = tmp_path / "real" / "target.safetensors"
    target.parent.mkdir()
    target.write_bytes(b"old")
    link = tmp_path / "link.safetensors"
    link.symlink_to(target)
    rc, out, err = cli("--home", home, "export", "st-lora", "--format", "kohya", "--output", link)
    assert rc == 0, err
    assert link.is_symlink() and os.readlink(link) == str(target)   # the link stays a link
    assert target.read_bytes() == direct.read_bytes()               # its target got the bytes
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]   # no temp file left next to the link


def test_dangling_symlinks_and_links_into_a_registry_are_refused(edge_registry, cli, tmp_path):
    home = edge_registry["home"]
    dangling = tmp_path / "dangling.safetensors"
    dangling.symlink_to(tmp_path / "missing" / "x.safetensors")
    rc, _, err = cli("--home", home, "export", "st-lora", "--format", "kohya", "--output", dangling)
    assert rc == 2 and "which does not exist" in err and dangling.is_symlink(), err
    sneaky = tmp_path / "catalog-link.safetensors"
    sneaky.symlink_to(home / "catalog.db")
    before = snapshot(home)
    rc, _, err = cli("--home", home, "export", "st-lora", "--format", "kohya", "--output", sneaky)
    assert rc == 2 and "is inside the registry" in err, err
    assert snapshot(home) == before


def test_atomic_path_is_the_last_gate(edge_registry, tmp_path):
    """Code that writes without an early check still cannot replace a node or a registry file."""
    from lbm_registry.fileio import atomic_path

    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for dest in (fifo, edge_registry["home"] / "catalog.db", edge_registry["home"] / "blobs" / "x"):
        with pytest.raises(ConfigError), atomic_path(dest) as tmp:
            tmp.write_bytes(b"never")
    assert stat.S_ISFIFO(fifo.lstat().st_mode)
