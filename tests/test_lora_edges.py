"""LoRA files at the edges (issue 22 items 9, 10, 11, 16, 22): integer factors, a recorded base
in any format, unbounded foreign metadata, one convention for layers a budget drops, and
safetensors headers with a key given twice."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from lbm_registry.errors import CheckpointError, LoRAError


def _rewrite(src: Path, dest: Path, *, cast: str | None = None, metadata: dict[str, str] | None = None,
             keep_metadata: bool = True) -> Path:
    """``src`` re-saved with its factor tensors cast to ``cast`` and/or its metadata changed."""
    from safetensors import safe_open

    tensors = load_file(str(src))
    with safe_open(str(src), "np") as fh:
        meta = dict(fh.metadata() or {}) if keep_metadata else {}
    if cast is not None:
        tensors = {k: (v * 100).astype(cast) if not k.endswith(".alpha") else v for k, v in tensors.items()}
    meta.update(metadata or {})
    save_file(tensors, str(dest), metadata=meta)
    return dest


@pytest.fixture(scope="module")
def import_registry(edge_registry, tmp_path_factory, tiny_base_path):
    """The shared edge registry (bases ``st-base`` and ``st-other``), with a native LoRA of
    ``st-base`` (file only) and its kohya export (file only)."""
    from fixtures.serve import write_random_lora

    from lbm_registry.lora.export import export_lora
    from lbm_registry.lora.format import read_lora

    folder = tmp_path_factory.mktemp("import-edges")
    native = write_random_lora(tiny_base_path, folder / "native.safetensors", seed=21, rank=2, conv_rank=2)
    [kohya] = export_lora(read_lora(native), "kohya", folder / "kohya.safetensors")
    return {**edge_registry, "native": native, "kohya": kohya, "folder": folder}


def _import(cli, reg, path: Path, name: str, base: str = "st-base", *extra: str) -> tuple[int, str, str]:
    return cli("--home", reg["home"], "import", path, "--kind", "lora", "--name", name, "--base", base,
               "--probe", "off", *extra)


# -- item 9: integer factors ---------------------------------------------------------------------
@pytest.mark.parametrize("fmt,dtype", [("native", "int8"), ("kohya", "int8"), ("native", "uint8"),
                                       ("kohya", "int32")])
def test_integer_lora_factors_are_refused_in_one_line(import_registry, cli, tmp_path, fmt, dtype):
    bad = _rewrite(import_registry[fmt], tmp_path / f"{fmt}-{dtype}.safetensors", cast=dtype)
    rc, _, err = _import(cli, import_registry, bad, f"int-{fmt}-{dtype}")
    assert rc == 2 and len(err.strip().splitlines()) == 1, err
    assert f"is {dtype}: LoRA factors must be floating point" in err, err
    from lbm_registry.lora.format import read_lora

    if fmt == "native":  # every reader of our format refuses them (infer, serve, validate, train...)
        with pytest.raises(LoRAError, match="must be floating point"):
            read_lora(bad)


def test_the_catalog_records_the_tensors_dtype_not_the_metadata(import_registry, cli, tmp_path):
    raw = json.loads(load_meta(import_registry["native"])["lbm_registry"])
    assert load_file(str(import_registry["native"]))  # fp32 factors
    raw["dtype"] = "bf16"   # the metadata lies
    liar = _rewrite(import_registry["native"], tmp_path / "liar.safetensors", metadata={"lbm_registry": json.dumps(raw)})
    rc, _, err = _import(cli, import_registry, liar, "dtype-liar")
    assert rc == 0, err
    rc, out, _ = cli("--home", import_registry["home"], "show", "dtype-liar", "--json")
    shown = json.loads(out)
    assert shown["dtype"] == "fp32" and shown["facts"]["dtype"] == "fp32", shown


def load_meta(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), "np") as fh:
        return dict(fh.metadata() or {})


# -- item 10: a recorded base, whatever the format ---------------------------------------------------
@pytest.mark.parametrize("fmt", ["native", "kohya", "peft"])
def test_a_file_that_records_its_base_is_refused_on_another_base(import_registry, cli, tmp_path, fmt):
    path = import_registry.get(fmt)
    if fmt == "peft":
        from lbm_registry.lora.export import export_lora
        from lbm_registry.lora.format import read_lora

        path = tmp_path / "peft"
        export_lora(read_lora(import_registry["native"]), "peft", path)
    rc, _, err = _import(cli, import_registry, path, f"wrong-base-{fmt}", "st-other")
    assert rc == 2 and "was made for base sha256:" in err and "not st-other@1" in err, err
    rc, _, err = _import(cli, import_registry, path, f"right-base-{fmt}", "st-base", "--allow-duplicate")
    assert rc == 0, err


# -- item 11: unbounded foreign metadata ----------------------------------------------------------------
def test_huge_foreign_metadata_is_capped_in_the_catalog_and_in_show(import_registry, cli, tmp_path):
    from lbm_registry.api.assets.lora_import import METADATA_TOTAL_CAP, METADATA_VALUE_CAP
    from lbm_registry.registry.blobs import sha256_file

    tags = {f"tag{i}": i for i in range(150_000)}   # ~2.7 MB of JSON, as kohya's ss_tag_frequency grows
    big = _rewrite(import_registry["kohya"], tmp_path / "big.safetensors",
                   metadata={"ss_tag_frequency": json.dumps({"set": tags}), "ss_note": "x" * 10,
                             **{f"ss_extra_{i}": "y" * 1500 for i in range(40)}})
    original = sha256_file(big)
    db = import_registry["home"] / "catalog.db"
    before = db.stat().st_size
    rc, _, err = _import(cli, import_registry, big, "big-meta")
    assert rc == 0, err
    rc, out, _ = cli("--home", import_registry["home"], "show", "big-meta", "--json")
    meta = json.loads(out)["facts"]["source_metadata"]
    assert len(json.dumps(meta)) < METADATA_TOTAL_CAP + 2000 and len(out) < 200_000
    assert meta["ss_note"] == "x" * 10                          # small values are kept whole
    assert len(meta["ss_tag_frequency"]) < METADATA_VALUE_CAP and "characters in all" in meta["ss_tag_frequency"]
    assert "more metadata keys not stored" in meta.get("...", "")
    assert json.loads(out)["facts"]["source_sha256"] == original == sha256_file(big)  # the file is untouched
    assert db.stat().st_size - before < 1_000_000


# -- item 16: one convention for layers a budget drops ----------------------------------------------------
def test_resize_and_extract_count_dropped_layers_the_same_way(import_registry, tmp_path, make_tuned,
                                                              tiny_base_path, torch_single_thread):
    from lbm_registry.api.assets.algebra import resize
    from lbm_registry.api.assets.lora import extract

    s = import_registry["settings"]
    size = import_registry["native"].stat().st_size
    r = resize(str(import_registry["native"]), budget=size // 3, dtype="fp32",
               output=tmp_path / "small.safetensors", settings=s).result.to_dict(layers=True)
    e = extract(str(tiny_base_path), str(make_tuned(rank=4, seed=9)), budget=size // 3, dtype="fp32",
                output=tmp_path / "ex.safetensors", settings=s).result.to_dict(layers=True)
    for d, written in ((r, r["layers_written"]), (e, e["layers_extracted"])):
        dropped = [x for x in d["skipped"] if x.get("rel_error") is not None]
        assert dropped, "the budget should drop some layers"
        errs = [x["rel_error"] for x in d["layers"]] + [1.0] * len(dropped)
        assert d["layers_counted"] == written + len(dropped)
        assert d["mean_error"] == pytest.approx(sum(errs) / len(errs)) and d["max_error"] == 1.0
        assert d["worst"][0]["rel_error"] == 1.0 and d["worst"][0]["rank"] == 0
        assert d["rank_histogram"]["0"] == len(dropped)


def test_the_resize_summary_states_the_convention(import_registry, cli, tmp_path):
    size = import_registry["native"].stat().st_size
    rc, out, err = cli("--home", import_registry["home"], "resize", import_registry["native"], "--budget",
                       str(size // 3), "--output", tmp_path / "s.safetensors")
    assert rc == 0, err
    assert "with rank 0 count as 1.0" in out, out


# -- item 22: a key given twice in a safetensors header ---------------------------------------------------
def _raw_file(dest: Path, header: str, data: bytes) -> Path:
    raw = header.encode()
    raw += b" " * (-len(raw) % 8)
    dest.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return dest


TENSOR = '{"dtype":"F32","shape":[1],"data_offsets":[0,4]}'
DUPLICATES = {
    "tensor": f'{{"a":{TENSOR},"a":{TENSOR}}}',
    "metadata key": f'{{"__metadata__":{{"lbm_registry":"{{}}","lbm_registry":"x"}},"a":{TENSOR}}}',
    "metadata block": f'{{"__metadata__":{{}},"a":{TENSOR},"__metadata__":{{"x":"y"}}}}',
    "field": '{"a":{"dtype":"F32","dtype":"F16","shape":[1],"data_offsets":[0,4]}}',
}


@pytest.mark.parametrize("where", sorted(DUPLICATES))
def test_a_header_with_a_duplicate_key_is_refused_by_every_reader(tmp_path, where):
    from lbm_registry.lbm.checkpoint import CheckpointReader
    from lbm_registry.lbm.header import SafetensorsHeader
    from lbm_registry.registry.blobs import sniff_dtype

    path = _raw_file(tmp_path / "dup.safetensors", DUPLICATES[where], np.float32([1.0]).tobytes())
    for reader in (SafetensorsHeader, CheckpointReader):
        with pytest.raises(CheckpointError, match="appears twice in its header"):
            reader(path)
    assert sniff_dtype(path) is None


def test_import_refuses_a_lora_with_a_duplicate_tensor_key(import_registry, cli, tmp_path):
    """The safetensors library itself takes the last of two equal entries: ours must refuse first."""
    from safetensors import safe_open

    src = import_registry["native"]
    (n,) = struct.unpack("<Q", src.read_bytes()[:8])
    header = json.loads(src.read_bytes()[8:8 + n])
    key = next(k for k in header if k.endswith(".alpha"))
    text = json.dumps(header, separators=(",", ":"))
    entry = json.dumps({key: header[key]}, separators=(",", ":"))[1:-1]
    dup = _raw_file(tmp_path / "dup.safetensors", text[:-1] + "," + entry + "}", src.read_bytes()[8 + n:])
    with safe_open(str(dup), "np") as fh:   # the library accepts it (last wins)
        assert key in fh.keys()
    rc, _, err = _import(cli, import_registry, dup, "dup-key")
    assert rc == 2 and "appears twice" in err and len(err.strip().splitlines()) == 1, err
