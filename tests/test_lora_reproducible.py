"""Reproducible files and interoperable metadata: same inputs -> same bytes; ModelSpec and
kohya's sshs_* hashes recomputed here the way kohya computes them; bases known by tensor bytes."""

from __future__ import annotations

import hashlib
import io
import struct
from pathlib import Path

import pytest


def sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def kohya_hashes(path: Path) -> tuple[str, str]:
    """What kohya's trainer records: the in-memory safetensors save of the tensors with the
    ss_* metadata only; sha256 after the header, and sha256 of the 64 KiB at 1 MiB (8 hex)."""
    import safetensors.torch
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = {k: v for k, v in (f.metadata() or {}).items() if k.startswith("ss_")}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    data = safetensors.torch.save(tensors, meta)
    b = io.BytesIO(data)
    (n,) = struct.unpack("<Q", b.read(8))
    b.seek(n + 8)
    model = hashlib.sha256(b.read()).hexdigest()
    b.seek(0x100000)
    legacy = hashlib.sha256(b.read(0x10000)).hexdigest()[:8]
    return model, legacy


def test_base_create_twice_same_bytes(tmp_path, lora_settings):
    from lbm_registry.api.assets.base import create_base

    a = create_base("lbm-tiny", output=tmp_path / "a.safetensors", settings=lora_settings)
    b = create_base("lbm-tiny", output=tmp_path / "b.safetensors", settings=lora_settings)
    assert a["sha256"] == b["sha256"] == sha(tmp_path / "a.safetensors")


def test_extract_twice_same_bytes_and_interop_metadata(tmp_path, tiny_base_path, make_tuned, lora_settings):
    from safetensors import safe_open

    from lbm_registry.api.assets.lora import extract
    from lbm_registry.safetensors_layout import tensor_sha256

    tuned = make_tuned(rank=4)
    paths = []
    for i in range(2):
        paths.append(tmp_path / f"l{i}.safetensors")
        extract(str(tiny_base_path), str(tuned), rank=32, conv_rank=16, dtype="fp32", output=paths[-1],
                settings=lora_settings)
    assert sha(paths[0]) == sha(paths[1])
    assert paths[0].stat().st_size > 0x110000  # the legacy hash window lies inside the file
    with safe_open(str(paths[0]), "pt") as f:
        meta = f.metadata()
    assert meta["modelspec.sai_model_spec"] == "1.0.1"
    assert meta["modelspec.architecture"] == "lbm-tiny/lora"
    assert "sdxl" not in meta["modelspec.architecture"].lower()
    for key in ("modelspec.implementation", "modelspec.title", "modelspec.date"):
        assert meta[key]
    data = paths[0].read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    assert meta["modelspec.hash_sha256"] == "0x" + hashlib.sha256(data[8 + n:]).hexdigest()
    assert tensor_sha256(paths[0]) == meta["modelspec.hash_sha256"][2:]
    model, legacy = kohya_hashes(paths[0])
    assert meta["sshs_model_hash"] == model
    assert meta["sshs_legacy_hash"] == legacy
    assert "created" not in meta["lbm_registry"]
    header = data[8:8 + n].decode()
    keys = [k for k in meta]
    positions = [header.index(f'"{k}":') for k in sorted(keys)]
    assert positions == sorted(positions)


def test_export_files_carry_modelspec(tmp_path, full_rank_lora, lora_settings):
    from safetensors import safe_open

    from lbm_registry.api.assets.lora import export

    _, report = full_rank_lora
    out = export(report.path, fmt="kohya", output=tmp_path / "k.safetensors", settings=lora_settings)
    with safe_open(out.paths[0], "pt") as f:
        meta = f.metadata()
    assert meta["sshs_model_hash"] == kohya_hashes(Path(out.paths[0]))[0]
    assert meta["modelspec.hash_sha256"] == "0x" + meta["sshs_model_hash"]
    assert meta["ss_network_module"] == "networks.lora"


def test_resaved_base_still_matches_and_duplicate_import_refused(tmp_path, tiny_base_path, make_tuned,
                                                                  reg_settings, tiny_config_path):
    from lbm_registry.api.assets.lora import extract, lora_fits_base
    from lbm_registry.api.assets.models import import_model
    from lbm_registry.api.registry import list_assets, resolve
    from lbm_registry.errors import RegistryError
    from lbm_registry.lbm.checkpoint import CheckpointReader, save_safetensors

    base = import_model(tiny_base_path, name="repro-base", kind="base", settings=reg_settings)
    assert base.facts["tensor_sha256"]
    before = [a for a in list_assets(reg_settings) if a["name"] == "repro-base"][0]["versions"]
    with pytest.raises(RegistryError, match="already registered as repro-base@1"):
        import_model(tiny_base_path, name="repro-base-again", kind="base", settings=reg_settings)
    assert [a for a in list_assets(reg_settings) if a["name"] == "repro-base"][0]["versions"] == before
    assert not [a for a in list_assets(reg_settings) if a["name"] == "repro-base-again"]
    again = import_model(tiny_base_path, name="repro-base", kind="base", settings=reg_settings, allow_duplicate=True)
    assert again.version == 2

    # A re-save with other metadata: another file sha256, the same tensor bytes.
    r = CheckpointReader(tiny_base_path)
    resaved = save_safetensors(r.state_dict(), tmp_path / "resaved.safetensors", {**r.metadata, "note": "resaved"})
    assert sha(resaved) != base.sha256
    lora = tmp_path / "l.safetensors"
    extract("repro-base@1", str(make_tuned(rank=4)), rank=4, conv_rank=4, output=lora, settings=reg_settings)
    from lbm_registry.lora.format import read_lora

    info = read_lora(lora).info
    assert lora_fits_base(info["base_sha256"], info["base_tensor_sha256"], resolve(str(resaved), reg_settings))
    other = tmp_path / "other.safetensors"
    sd = r.state_dict()
    k = next(iter(sd))
    sd[k] = sd[k] + 1
    save_safetensors(sd, other, r.metadata)
    assert not lora_fits_base(info["base_sha256"], info["base_tensor_sha256"], resolve(str(other), reg_settings))
