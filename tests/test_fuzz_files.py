"""Property-based fuzzing of what users hand us as files (issue 22, "A fuzz suite"): safetensors
headers, LoRA layouts of every imported format, and output paths. The contract, whatever the
input: one ``LBMError`` (on the command line: one line, exit 2 for bad input, 1 for a refusal of
the machine, no traceback), nothing changed on disk, ``doctor`` clean. Profiles: tests/fixtures/fuzz.py.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import socket
import stat
import struct
from pathlib import Path

import numpy as np
import pytest
from fixtures.fuzz import fuzz_settings
from fixtures.storage import mounts_available, run_batch, snapshot
from hypothesis import assume, given, note, settings
from hypothesis import strategies as st

from lbm_registry.errors import LBMError

_ids = itertools.count()


def _fresh(folder: Path, name: str) -> Path:
    path = folder / f"{next(_ids)}-{name}"
    path.mkdir(parents=True)
    return path


# == safetensors headers =============================================================================
from lbm_registry.lbm.header import DTYPE_BITS  # noqa: E402

BAD_DTYPES = ["F31", "", "f32", "INT8", "F8"]
NAMES = ["a", "b", "denoiser.x.weight", "model.denoiser.y.weight", "lpips_loss.z", "é/ü", "__metadata__", " "]


def _nbytes(dtype: str, shape: list) -> int | None:
    if dtype not in DTYPE_BITS or not all(isinstance(d, int) and d >= 0 for d in shape):
        return None
    bits = DTYPE_BITS[dtype] * math.prod(shape)
    return bits // 8 if bits % 8 == 0 else None


@st.composite
def safetensors_files(draw) -> bytes:
    """Mostly well-formed files with one or more hostile twists: lengths, offsets, shapes, dtypes,
    duplicate keys, metadata types and sizes, truncation, trailing bytes, garbage."""
    entries: list[tuple[str, str]] = []   # (key, JSON text of the value): duplicates are possible
    offset = 0
    for _ in range(draw(st.integers(0, 4))):
        name = draw(st.sampled_from(NAMES))
        dtype = draw(st.sampled_from(["F32", "F16", "BF16", "I8", "U8", "F64", "BOOL", "F4", "F6_E2M3"] + BAD_DTYPES))
        shape = draw(st.one_of(st.lists(st.integers(0, 5), max_size=3), st.lists(st.integers(-3, 2**40), max_size=2),
                               st.just("3"), st.just([1.5]), st.just(None)))
        size = _nbytes(dtype, shape if isinstance(shape, list) else [])
        begin = draw(st.sampled_from([offset, offset, offset + 1, max(0, offset - 1), 0, -1, 2**63]))
        length = size if size is not None else draw(st.integers(0, 16))
        end = draw(st.sampled_from([begin + length, begin + length, begin + length + 1, begin, begin - 1]))
        offsets = draw(st.sampled_from([[begin, end], [begin, end], [begin], [begin, end, end], "0,4",
                                        [float(begin), end]]))
        value = {"dtype": dtype, "shape": shape, "data_offsets": offsets}
        if draw(st.booleans()) and draw(st.booleans()):
            del value[draw(st.sampled_from(["dtype", "shape", "data_offsets"]))]
        entries.append((name, json.dumps(value)))
        if isinstance(end, int) and end > offset:
            offset = min(end, 1 << 16)
    meta_kind = draw(st.sampled_from(["none", "strings", "strings", "big", "not-strings", "list", "duplicate"]))
    if meta_kind != "none":
        if meta_kind == "strings":
            meta = json.dumps(draw(st.dictionaries(st.text(max_size=8), st.text(max_size=40), max_size=4)))
        elif meta_kind == "big":
            meta = json.dumps({"ss_tag_frequency": "x" * draw(st.sampled_from([10_000, 300_000]))})
        elif meta_kind == "not-strings":
            meta = json.dumps({"a": draw(st.sampled_from([1, None, [1], {"b": "c"}, True]))})
        elif meta_kind == "list":
            meta = "[]"
        else:
            meta = '{"lbm_registry":"{}","lbm_registry":"{\\"base_sha256\\":1}"}'
        entries.insert(draw(st.integers(0, len(entries))), ("__metadata__", meta))
    if entries and draw(st.booleans()) and not draw(st.booleans()):
        entries.append(draw(st.sampled_from(entries)))               # the same key twice
    raw = ("{" + ",".join(f"{json.dumps(k)}:{v}" for k, v in entries) + "}").encode()
    twist = draw(st.sampled_from(["none", "none", "none", "pad", "cut", "byte", "not-object", "nested"]))
    if twist == "pad":
        raw += b" " * (-len(raw) % 8)
    elif twist == "cut" and raw:
        raw = raw[:draw(st.integers(0, len(raw) - 1))]
    elif twist == "byte" and raw:
        i = draw(st.integers(0, len(raw) - 1))
        raw = raw[:i] + bytes([draw(st.integers(0, 255))]) + raw[i + 1:]
    elif twist == "not-object":
        raw = draw(st.sampled_from([b"[]", b"1", b'"x"', b"null", b"\xff\xfe{}"]))
    elif twist == "nested":
        raw = b'{"a":' + b"[" * 5000 + b"]" * 5000 + b"}"
    data_len = draw(st.sampled_from([offset, offset, offset - 1, offset + 3, 0]))
    data = np.random.default_rng(len(raw)).standard_normal(max(0, data_len) // 4 + 1).astype(np.float32).tobytes()
    data = data[:max(0, data_len)]
    length = draw(st.sampled_from([len(raw), len(raw), len(raw), 0, len(raw) + 1, max(0, len(raw) - 1), 2**63 - 1,
                                   2**64 - 1]))
    return struct.pack("<Q", length) + raw + data


def _library_view(path: Path) -> dict | None:
    """What the safetensors library reads (key -> shape), or None when it refuses the file."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as fh:   # numpy has no bfloat16
            return {k: tuple(fh.get_slice(k).get_shape()) for k in fh.keys()}
    except Exception:
        return None


@given(blob=safetensors_files())
def test_fuzz_safetensors_header_reader(tmp_path_factory, blob):
    """Our torch-free reader (import, check_finite, sniff_dtype) and the torch reader answer a
    hostile header with one CheckpointError; what ours accepts, the safetensors library reads the
    same way (we are never the more lenient one: a file we register is a file we can load)."""
    from lbm_registry.errors import CheckpointError
    from lbm_registry.lbm.checkpoint import CheckpointReader
    from lbm_registry.lbm.header import SafetensorsHeader
    from lbm_registry.registry.blobs import sniff_dtype

    path = _fresh(tmp_path_factory.getbasetemp() / "fuzz-headers", "h") / "f.safetensors"
    path.write_bytes(blob)
    try:
        header = SafetensorsHeader(path)
    except CheckpointError as exc:
        note(str(exc))
        header = None
    sniff_dtype(path)   # never raises
    try:
        reader = CheckpointReader(path)
    except CheckpointError:
        reader = None
    if header is not None:
        lib = _library_view(path)
        assert lib is not None, "our reader accepted a file the safetensors library refuses"
        assert {k: tuple(v["shape"]) for k, v in header._header.items()} == lib
        assert reader is not None and set(reader.keys()) == set(header.keys())
        try:
            header.check_finite()
        except CheckpointError:
            pass
        for key in reader.keys():   # dtypes torch lacks (F6, F4...) are one CheckpointError too
            try:
                reader.get(key)
                reader.read(key)
            except CheckpointError:
                pass


def test_fuzz_headers_through_import(edge_registry, cli, tmp_path):
    """The same hostile files given to ``lbm-reg import``: one line, exit 2, nothing changed."""
    home = edge_registry["home"]
    before = snapshot(home)

    @settings(fuzz_settings(0.3))
    @given(blob=safetensors_files(), kind=st.sampled_from(["base", "lora"]))
    def check(blob, kind):
        path = _fresh(tmp_path, "imp") / "in.safetensors"
        path.write_bytes(blob)
        extra = ["--base", "st-base"] if kind == "lora" else ["--config", "lbm-tiny"]
        rc, _, err = cli("--home", home, "import", path, "--kind", kind, "--name", f"fz{next(_ids)}",
                         "--probe", "off", *extra)
        assert rc == 2 and len(err.strip().splitlines()) == 1 and err.startswith("error: "), err

    check()
    assert snapshot(home) == before


# == LoRA layouts of every imported format ==========================================================
FORMATS = ["native", "kohya", "kohya-tucker", "peft", "diffusers", "loha", "loha-tucker", "lokr", "lokr-factored",
           "dora", "full"]
MUTATIONS = ["none", "none", "none", "nan", "inf", "int8", "float64", "float16", "rank0", "wrong-shape",
             "missing-part", "alpha-vector", "alpha-negative", "alpha-zero", "alpha-nan", "alpha-huge",
             "text-encoder", "unknown-module", "extra-key", "empty", "scalar-factor", "huge-values"]


@pytest.fixture(scope="module")
def tiny_modules(tiny_base_path) -> dict[str, tuple[int, ...]]:
    from lbm_registry.lbm.header import SafetensorsHeader

    shapes = SafetensorsHeader(tiny_base_path).shapes("denoiser.")
    return {k[len("denoiser."):-len(".weight")]: v for k, v in shapes.items() if k.endswith(".weight") and len(v) >= 2}


def _pick(modules: dict[str, tuple[int, ...]]) -> list[str]:
    """One linear, one 3x3 conv and one 1x1 conv of the base (each kind of layer a LoRA targets)."""
    linear = next(m for m, s in modules.items() if len(s) == 2)
    conv3 = next(m for m, s in modules.items() if len(s) == 4 and s[2] == 3)
    conv1 = next(m for m, s in modules.items() if len(s) == 4 and s[2] == 1)
    return [linear, conv3, conv1]


@st.composite
def lora_layouts(draw, modules: dict[str, tuple[int, ...]]):
    """(format, {key: array}, adapter_config or None) for 1-3 real modules of the base, each
    layout of the right shape, then hostile mutations."""
    fmt = draw(st.sampled_from(FORMATS))
    chosen = draw(st.lists(st.sampled_from(_pick(modules)), min_size=1, max_size=3, unique=True))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    tensors: dict[str, np.ndarray] = {}
    cfg = None
    for module in chosen:
        shape = modules[module]
        out, rest = shape[0], shape[1:]
        n_in = math.prod(rest)
        r = draw(st.integers(1, 4))

        def a(*s):
            return (rng.standard_normal(s) * 0.05).astype(np.float32)

        kohya = "lora_unet_" + module.replace(".", "_")
        if fmt == "native":
            key = f"denoiser.{module}"
            tensors |= {f"{key}.lora_down.weight": a(r, *rest), f"{key}.lora_up.weight": a(out, r, *([1, 1] if len(shape) == 4 else [])),
                        f"{key}.alpha": np.array(r, np.float32)}
        elif fmt in ("kohya", "kohya-tucker"):
            if fmt == "kohya-tucker" and len(shape) == 4:
                tensors |= {f"{kohya}.lora_down.weight": a(r, shape[1], 1, 1), f"{kohya}.lora_mid.weight": a(r, r, *shape[2:]),
                            f"{kohya}.lora_up.weight": a(out, r, 1, 1)}
            else:
                tensors |= {f"{kohya}.lora_down.weight": a(r, *rest),
                            f"{kohya}.lora_up.weight": a(out, r, *([1, 1] if len(shape) == 4 else []))}
            tensors[f"{kohya}.alpha"] = np.array(draw(st.sampled_from([r, 1, 8])), np.float32)
        elif fmt in ("peft", "diffusers"):
            prefix = draw(st.sampled_from(["", "unet.", "base_model.model."]))
            tensors |= {f"{prefix}{module}.lora_A.weight": a(r, *rest),
                        f"{prefix}{module}.lora_B.weight": a(out, r, *([1, 1] if len(shape) == 4 else []))}
            cfg = draw(st.sampled_from([None, {"lora_alpha": 8}, {"lora_alpha": "x"}, {"lora_alpha": -1},
                                        {"lora_alpha": 4, "use_rslora": True}, {"alpha_pattern": {"[": 1}},
                                        {"alpha_pattern": {module: 2.0}}, []]))
        elif fmt in ("loha", "loha-tucker"):
            if fmt == "loha-tucker" and len(shape) == 4:
                tensors |= {f"{kohya}.hada_t1": a(r, r, *shape[2:]), f"{kohya}.hada_t2": a(r, r, *shape[2:]),
                            f"{kohya}.hada_w1_a": a(r, out), f"{kohya}.hada_w1_b": a(r, shape[1]),
                            f"{kohya}.hada_w2_a": a(r, out), f"{kohya}.hada_w2_b": a(r, shape[1])}
            else:
                tensors |= {f"{kohya}.hada_w1_a": a(out, r), f"{kohya}.hada_w1_b": a(r, n_in),
                            f"{kohya}.hada_w2_a": a(out, r), f"{kohya}.hada_w2_b": a(r, n_in)}
            tensors[f"{kohya}.alpha"] = np.array(r, np.float32)
        elif fmt in ("lokr", "lokr-factored"):
            f1 = next(f for f in (4, 2, 1) if out % f == 0 and shape[1] % f == 0)
            w2 = (out // f1, shape[1] // f1, *shape[2:])
            tensors[f"{kohya}.lokr_w1"] = a(f1, f1)
            if fmt == "lokr" or len(shape) == 4:
                tensors[f"{kohya}.lokr_w2"] = a(*w2)
            else:
                tensors |= {f"{kohya}.lokr_w2_a": a(w2[0], r), f"{kohya}.lokr_w2_b": a(r, w2[1])}
        elif fmt == "dora":
            tensors |= {f"{kohya}.lora_down.weight": a(r, *rest),
                        f"{kohya}.lora_up.weight": a(out, r, *([1, 1] if len(shape) == 4 else [])),
                        f"{kohya}.dora_scale": np.abs(a(1, n_in)) + 1, f"{kohya}.alpha": np.array(r, np.float32)}
        else:  # full
            tensors[f"{kohya}.diff"] = a(*shape)
    for _ in range(draw(st.integers(0, 2))):
        _mutate(draw, tensors, rng)
    return fmt, tensors, cfg


def _mutate(draw, tensors: dict[str, np.ndarray], rng) -> None:
    how = draw(st.sampled_from(MUTATIONS))
    keys = sorted(tensors)
    key = draw(st.sampled_from(keys)) if keys else None
    factors = [k for k in keys if not k.endswith(".alpha")]
    fkey = draw(st.sampled_from(factors)) if factors else None
    if how == "nan" and fkey:
        tensors[fkey].reshape(-1)[0] = np.nan
    elif how == "inf" and fkey:
        tensors[fkey].reshape(-1)[-1] = np.inf
    elif how in ("int8", "float64", "float16") and fkey:
        tensors[fkey] = np.asarray(tensors[fkey] * 100).astype(how)
    elif how == "rank0" and fkey and tensors[fkey].ndim:
        tensors[fkey] = tensors[fkey][:0]
    elif how == "wrong-shape" and fkey and tensors[fkey].ndim:
        t = tensors[fkey]
        tensors[fkey] = np.zeros((t.shape[0] + 1, *t.shape[1:]), dtype=t.dtype)
    elif how == "missing-part" and key:
        del tensors[key]
    elif how.startswith("alpha"):
        alphas = [k for k in keys if k.endswith(".alpha")]
        if alphas:
            k = draw(st.sampled_from(alphas))
            tensors[k] = {"alpha-vector": np.ones(3, np.float32), "alpha-negative": np.array(-2, np.float32),
                          "alpha-zero": np.array(0, np.float32), "alpha-nan": np.array(np.nan, np.float32),
                          "alpha-huge": np.array(3e38, np.float32)}[how]
    elif how == "text-encoder":
        tensors["lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight"] = np.zeros((2, 4), np.float32)
    elif how == "unknown-module":
        tensors["lora_unet_no_such_block.lora_down.weight"] = np.zeros((2, 4), np.float32)
    elif how == "extra-key":
        tensors["something.else"] = np.zeros(2, np.float32)
    elif how == "empty":
        tensors.clear()
    elif how == "scalar-factor" and fkey:
        tensors[fkey] = np.array(1, np.float32)
    elif how == "huge-values" and fkey and tensors[fkey].dtype == np.float32:
        tensors[fkey] = np.full_like(tensors[fkey], 3e38)
    for k in list(tensors):   # arithmetic on a 0-d array gives a numpy scalar: files want arrays
        tensors[k] = np.asarray(tensors[k])


def _write_layout(folder: Path, fmt: str, tensors: dict[str, np.ndarray], cfg) -> Path:
    from safetensors.numpy import save_file

    if fmt in ("peft", "diffusers"):
        folder = folder / "adapter"
        folder.mkdir()
        name = "adapter_model.safetensors" if fmt == "peft" else "pytorch_lora_weights.safetensors"
        if cfg is not None:
            (folder / "adapter_config.json").write_text(json.dumps(cfg))
        save_file(tensors, str(folder / name)) if tensors else (folder / name).write_bytes(b"")
        return folder
    path = folder / "lora.safetensors"
    if tensors:
        save_file(tensors, str(path))
    else:
        path.write_bytes(struct.pack("<Q", 2) + b"{}")
    return path


@given(data=st.data())
def test_fuzz_lora_layouts_of_every_format(tiny_modules, tiny_base_path, tmp_path_factory, data):
    """Reading, checking against the base and converting (to our native file, dense layers
    re-factored) raise only LBMError; what converts reads back as a valid native LoRA."""
    from lbm_registry.api.assets.lora_import import write_native
    from lbm_registry.lbm.checkpoint import CheckpointReader
    from lbm_registry.lora.convert import check_against_base, read_foreign
    from lbm_registry.lora.format import read_lora
    from lbm_registry.lora.ranks import RankPolicy

    fmt, tensors, cfg = data.draw(lora_layouts(tiny_modules))
    note(f"{fmt}: {[(k, v.dtype.name, v.shape) for k, v in tensors.items()]} cfg={cfg}")
    folder = _fresh(tmp_path_factory.getbasetemp() / "fuzz-loras", fmt)
    path = _write_layout(folder, fmt, tensors, cfg)
    try:
        foreign = read_foreign(path, tiny_modules)
        check_against_base(foreign, tiny_modules)
        rows, *_ = write_native(foreign, tiny_modules, CheckpointReader(tiny_base_path), folder / "native.safetensors",
                               RankPolicy.from_options(rank=4, conv_rank=4), {"base_sha256": "0" * 64})
    except LBMError as exc:
        note(str(exc))
        assert str(exc) and "\n" not in str(exc)
        return
    back = read_lora(folder / "native.safetensors")
    assert set(back.layers) == {r["module"] for r in rows} and all(math.isfinite(r["rel_error"]) for r in rows)


def test_fuzz_lora_layouts_through_import(edge_registry, cli, tmp_path, tiny_modules):
    """Hostile LoRAs given to ``lbm-reg import --kind lora``: refused in one line with nothing
    changed, or registered (then doctor is clean)."""
    home = edge_registry["home"]

    @settings(fuzz_settings(0.2))
    @given(layout=lora_layouts(tiny_modules))
    def check(layout):
        fmt, tensors, cfg = layout
        before = snapshot(home)
        path = _write_layout(_fresh(tmp_path, fmt), fmt, tensors, cfg)
        rc, _, err = cli("--home", home, "import", path, "--kind", "lora", "--name", f"fz{next(_ids)}", "--base",
                         "st-base", "--probe", "off", "--allow-duplicate")
        assert rc in (0, 2) and "Traceback" not in err, err
        if rc == 2:
            assert len(err.strip().splitlines()) == 1 and err.startswith("error: "), err
            assert snapshot(home) == before
        else:
            from lbm_registry.api.registry import doctor

            report = doctor(edge_registry["settings"])
            assert report["ok"], report["issues"]

    check()


# == output paths ======================================================================================
MANAGED = ["catalog.db", "catalog.db-wal", "catalog.db-shm", "catalog.db-journal", "mlflow.db", "mlflow.db-wal",
           "mlflow.db-journal", "blobs/sha256/ab/abcd", "blobs/sha256/cd/new", "blobs/x", ".locks/catalog.lock",
           ".locks/new", "artifacts/0123/artifacts/weights/w.safetensors", "artifacts/new.png"]
KINDS = ["new", "file", "folder", "fifo", "socket", "device", "link-file", "link-missing", "link-folder", "link-fifo",
         "link-managed", "under-file", "managed", "managed-folder", "odd-name"]


def _fake_registry(root: Path) -> Path:
    """A registry's layout (what the output checks recognise), with files in every managed place."""
    home = root / "home"
    for rel in ("catalog.db", "mlflow.db", "blobs/sha256/ab/abcd", ".locks/catalog.lock",
                "artifacts/0123/artifacts/weights/w.safetensors"):
        (home / rel).parent.mkdir(parents=True, exist_ok=True)
        (home / rel).write_bytes(b"registry bytes")
    return home


def _make_target(root: Path, home: Path, kind: str, managed: str, name: str) -> Path:
    if kind == "new":
        return root / "out" / name
    if kind == "file":
        (root / name).write_bytes(b"old")
        return root / name
    if kind == "folder":
        (root / name).mkdir()
        return root / name
    if kind in ("fifo", "link-fifo"):
        os.mkfifo(root / "fifo")
        if kind == "fifo":
            return root / "fifo"
        (root / name).symlink_to(root / "fifo")
        return root / name
    if kind == "socket":
        s = socket.socket(socket.AF_UNIX)
        s.bind(str(root / "sock"))
        s.close()
        return root / "sock"
    if kind == "device":
        if os.geteuid() != 0:
            return root / "out" / name
        os.mknod(root / "dev", stat.S_IFCHR | 0o600, os.makedev(1, 3))
        return root / "dev"
    if kind == "link-file":
        (root / "target").write_bytes(b"old")
        (root / name).symlink_to(root / "target")
        return root / name
    if kind == "link-missing":
        (root / name).symlink_to(root / "nowhere" / "x")
        return root / name
    if kind == "link-folder":
        (root / "dir").mkdir()
        (root / name).symlink_to(root / "dir")
        return root / name
    if kind == "link-managed":
        (root / name).symlink_to(home / managed)
        return root / name
    if kind == "under-file":
        (root / "plain").write_bytes(b"old")
        return root / "plain" / name
    if kind == "managed":
        return home / managed
    if kind == "managed-folder":
        return home / managed.split("/")[0] / "sub"
    return root / name   # odd-name: the name itself is the hostile part


def _tree(root: Path) -> dict[str, tuple]:
    """Every entry under ``root``: its type, and a regular file's bytes (what must not change)."""
    out = {}
    for p in sorted(root.rglob("*")):
        st_ = p.lstat()
        out[str(p.relative_to(root))] = (stat.S_IFMT(st_.st_mode), p.read_bytes() if stat.S_ISREG(st_.st_mode) else
                                         (os.readlink(p) if p.is_symlink() else None))
    return out


@given(kind=st.sampled_from(KINDS), managed=st.sampled_from(MANAGED),
       name=st.one_of(st.sampled_from(["out.safetensors", "o u t.png", "é.bin", ".hidden", "x" * 200, "-dash"]),
                      st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="/\x00"),
                              min_size=1, max_size=30)),
       writer=st.sampled_from(["atomic_path", "lora_writer", "check_file", "check_folder"]))
def test_fuzz_output_paths(tmp_path_factory, kind, managed, name, writer):
    """Every way to name an output: written as a regular file where it may be (symlinks written
    through), else one LBMError with nothing changed: never a replaced node, never a registry file,
    never a temp file left behind."""
    import torch

    from lbm_registry.fileio import atomic_path, check_output_file, check_output_folder
    from lbm_registry.lora.format import LoRALayer, LoRAWriter

    assume(name not in (".", ".."))
    root = _fresh(tmp_path_factory.getbasetemp() / "fuzz-outputs", "o")
    home = _fake_registry(root)
    try:
        target = _make_target(root, home, kind, managed, name)
    except OSError:   # a name this file system does not take (too long...): nothing to test
        assume(False)
    before = _tree(root)
    try:
        if writer == "atomic_path":
            with atomic_path(target) as tmp:
                tmp.write_bytes(b"new bytes")
        elif writer == "lora_writer":
            with LoRAWriter(target, torch.float32) as w:
                w.add(LoRALayer("m", torch.ones(1, 2), torch.ones(2, 1), 1.0))
                w.finish({})
        elif writer == "check_file":
            check_output_file(target, LBMError)
        else:
            check_output_folder(target, LBMError)
    except LBMError as exc:
        note(str(exc))
        assert str(exc) and "\n" not in str(exc)
        assert _tree(root) == before, "a refused output changed something"
        return
    after = _tree(root)
    if writer.startswith("check"):
        assert after == before
        return
    real = Path(os.path.realpath(target))
    assert real.is_file() and not real.is_symlink()
    assert home.resolve() not in real.parents, "wrote into a registry"
    changed = {k for k in set(before) | set(after) if before.get(k) != after.get(k)}
    expected = {str(real.relative_to(root.resolve()))} | {str(p.relative_to(root.resolve()))
                                                         for p in real.parents if root.resolve() in p.parents}
    assert changed <= expected, changed - expected   # nothing else touched, no temp file left
    if target.is_symlink():
        assert os.readlink(target) == before[str(target.relative_to(root))][1]   # still the same link


def test_fuzz_outputs_in_a_read_only_folder(need_mounts, tmp_path):
    """Outputs into a really read-only folder (a read-only bind mount, so root is refused too): one
    StorageError naming the path, exit-code 1 kind, nothing written. Hypothesis runs in the child."""
    ro = tmp_path / "ro"
    (ro / "sub").mkdir(parents=True)
    (ro / "existing.safetensors").write_bytes(b"old")
    code = f"""
import os
from pathlib import Path
from hypothesis import given, settings, strategies as st
from lbm_registry.errors import ConfigError, StorageError
from lbm_registry.fileio import atomic_path, make_folder
ro = Path({str(ro)!r})

@settings(max_examples={settings().max_examples}, deadline=None, database=None, derandomize=True)
@given(rel=st.sampled_from(["new.safetensors", "existing.safetensors", "sub/new.png", "new/deeper/x.bin"]),
       how=st.sampled_from(["atomic", "folder"]))
def check(rel, how):
    before = sorted(str(p) for p in ro.rglob("*"))
    try:
        if how == "atomic":
            with atomic_path(ro / rel) as tmp:
                tmp.write_bytes(b"x")
        else:
            make_folder(ro / rel)
    except StorageError as exc:
        assert str(ro) in str(exc) and "Read-only file system" in str(exc), exc
        assert exc.exit_code == 1
    except ConfigError as exc:   # a file where a folder should be: bad input, said first
        assert (ro / rel).is_file() and how == "folder", exc
    else:
        raise AssertionError("wrote into a read-only folder")
    assert sorted(str(p) for p in ro.rglob("*")) == before
    assert (ro / "existing.safetensors").read_bytes() == b"old"

check()
result = "ok"
"""
    [r] = run_batch([{"py": code}], mounts=[f"mount --bind -o ro {ro} {ro}"])
    assert r["rc"] == 0 and r["value"] == "ok", r["err"]


@pytest.mark.skipif(mounts_available() is None, reason="covered for real by the read-only mount variant")
def test_fuzz_outputs_in_a_read_only_folder_without_mounts(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root writes through chmod and this machine cannot mount a read-only folder")
    from lbm_registry.errors import StorageError
    from lbm_registry.fileio import atomic_path

    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        with pytest.raises(StorageError, match="Permission denied"), atomic_path(ro / "x.bin") as tmp:
            tmp.write_bytes(b"x")
    finally:
        ro.chmod(0o755)
