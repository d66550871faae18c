"""import --kind lora: foreign files written here from a known delta on the tiny twin, imported,
and compared with that delta; bad files refused with nothing registered."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import save_file

pytestmark = pytest.mark.usefixtures("torch_single_thread")

MODULES = ("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
           "down_blocks.1.attentions.0.transformer_blocks.0.ff.net.0.proj",
           "down_blocks.1.resnets.0.conv1",
           "down_blocks.1.resnets.0.conv_shortcut")
RANK = 4


@pytest.fixture(scope="module")
def shapes(tiny_base_path):
    from fixtures.lora import layer_names

    names = layer_names(tiny_base_path)
    return {m: names[m] for m in MODULES}


@pytest.fixture(scope="module")
def factors(shapes):
    """module -> (down (r, in, [k, k]), up (out, r, [1, 1])) of a known rank-4 delta."""
    g = torch.Generator().manual_seed(7)
    out = {}
    for m, s in shapes.items():
        down = torch.randn(RANK, *s[1:], generator=g) * 0.1
        up = torch.randn(s[0], RANK, *([1, 1] if len(s) == 4 else []), generator=g) * 0.1
        out[m] = (down, up)
    return out


@pytest.fixture(scope="module")
def base_ref(reg_settings, tiny_base_path):
    from lbm_registry.api.assets.models import import_model

    return import_model(tiny_base_path, name="imp-base", kind="base", settings=reg_settings).ref


def known(down, up, scale):
    r = down.shape[0]
    return (up.reshape(up.shape[0], r) @ down.reshape(r, -1)) * scale


def imported_delta(ref, settings, module):
    from lbm_registry.api.registry import resolve
    from lbm_registry.lora.format import read_lora

    la = read_lora(resolve(ref, settings).path).layers[module]
    return la.delta().reshape(la.weight_shape[0], -1)


def rel(a, b):
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


def do_import(path, name, settings, base, **kw):
    from lbm_registry.api.assets.lora_import import import_lora

    return import_lora(path, name=name, base=base, settings=settings, **kw)


def names(settings):
    from lbm_registry.api.registry import list_assets

    return {a["name"] for a in list_assets(settings)}


def test_kohya_alpha_not_rank(tmp_path, factors, reg_settings, base_ref):
    sd = {}
    for m, (down, up) in factors.items():
        key = "lora_unet_" + m.replace(".", "_")
        sd[key + ".lora_down.weight"] = down
        sd[key + ".lora_up.weight"] = up
        sd[key + ".alpha"] = torch.tensor(2.0)
    path = tmp_path / "kohya.safetensors"
    save_file(sd, str(path), {"ss_network_dim": "4", "ss_network_alpha": "2", "modelspec.title": "hand made"})
    rep = do_import(path, "imp-kohya", reg_settings, base_ref)
    assert rep.source_format == "kohya" and rep.converted == 0
    for m, (down, up) in factors.items():
        assert rel(imported_delta(rep.ref, reg_settings, m), known(down, up, 2.0 / RANK)) < 1e-5
    from lbm_registry.api.registry import show

    facts = show(rep.ref, reg_settings)["facts"]
    assert facts["source_format"] == "kohya"
    assert facts["source_metadata"]["ss_network_alpha"] == "2"
    assert facts["source_metadata"]["modelspec.title"] == "hand made"
    import hashlib

    assert facts["source_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    from lbm_registry.errors import RegistryError

    with pytest.raises(RegistryError, match="already registered as imp-kohya@1"):
        do_import(path, "imp-kohya2", reg_settings, base_ref)
    assert "imp-kohya2" not in names(reg_settings)


def test_peft_file_with_unet_prefix(tmp_path, factors, reg_settings, base_ref):
    sd = {}
    for m, (down, up) in factors.items():
        sd[f"unet.{m}.lora_A.weight"] = down
        sd[f"unet.{m}.lora_B.weight"] = up
    path = tmp_path / "pytorch_lora_weights.safetensors"
    save_file(sd, str(path), {"lora_adapter_metadata": json.dumps({"r": RANK, "lora_alpha": 8})})
    rep = do_import(path, "imp-peft", reg_settings, base_ref)
    assert rep.source_format == "diffusers"
    for m, (down, up) in factors.items():
        assert rel(imported_delta(rep.ref, reg_settings, m), known(down, up, 8 / RANK)) < 1e-5


def test_peft_folder_with_rank_and_alpha_patterns(tmp_path, factors, shapes, reg_settings, base_ref):
    folder = tmp_path / "adapter"
    folder.mkdir()
    sd, want = {}, {}
    g = torch.Generator().manual_seed(3)
    for i, (m, (down, up)) in enumerate(factors.items()):
        r = RANK if i % 2 == 0 else 2
        down, up = down[:r].clone(), up[:, :r].clone()
        sd[f"base_model.model.{m}.lora_A.weight"] = down
        sd[f"base_model.model.{m}.lora_B.weight"] = up + 0.01 * torch.randn(up.shape, generator=g)
        alpha = 16 if m.endswith("conv1") else 4
        want[m] = known(down, sd[f"base_model.model.{m}.lora_B.weight"], alpha / r)
    save_file(sd, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": RANK, "lora_alpha": 4,
        "rank_pattern": {m: 2 for j, m in enumerate(factors) if j % 2},
        "alpha_pattern": {"resnets.0.conv1": 16}}))
    rep = do_import(folder, "imp-peft-dir", reg_settings, base_ref)
    assert rep.source_format == "peft"
    for m in factors:
        assert rel(imported_delta(rep.ref, reg_settings, m), want[m]) < 1e-5


def test_locon_lora_mid_tucker_is_exact(tmp_path, shapes, reg_settings, base_ref):
    m = "down_blocks.1.resnets.0.conv1"
    out_c, in_c, kh, kw = shapes[m]
    g = torch.Generator().manual_seed(5)
    down = torch.randn(RANK, in_c, 1, 1, generator=g) * 0.1
    mid = torch.randn(RANK, RANK, kh, kw, generator=g) * 0.1
    up = torch.randn(out_c, RANK, 1, 1, generator=g) * 0.1
    key = "lora_unet_" + m.replace(".", "_")
    path = tmp_path / "locon.safetensors"
    save_file({key + ".lora_down.weight": down, key + ".lora_mid.weight": mid, key + ".lora_up.weight": up,
               key + ".alpha": torch.tensor(2.0)}, str(path))
    # up(mid(down(x))) as one conv: W[o, i] = sum_ab up[o, a] mid[a, b] down[b, i]
    dense = torch.einsum("oa,abhw,bi->oihw", up[:, :, 0, 0], mid, down[:, :, 0, 0]) * (2.0 / RANK)
    rep = do_import(path, "imp-locon", reg_settings, base_ref)
    assert rep.source_format == "kohya-locon-tucker" and rep.converted == 0
    assert rel(imported_delta(rep.ref, reg_settings, m), dense.reshape(out_c, -1)) < 1e-5


def _loha_lokr(tmp_path, shapes):
    g = torch.Generator().manual_seed(11)
    sd, dense = {}, {}
    for m in MODULES[:3]:
        s = shapes[m]
        n = math.prod(s[1:])
        key = "lora_unet_" + m.replace(".", "_")
        a1, b1 = torch.randn(s[0], RANK, generator=g), torch.randn(RANK, n, generator=g)
        a2, b2 = torch.randn(s[0], RANK, generator=g), torch.randn(RANK, n, generator=g)
        sd.update({key + ".hada_w1_a": a1, key + ".hada_w1_b": b1, key + ".hada_w2_a": a2,
                   key + ".hada_w2_b": b2, key + ".alpha": torch.tensor(1.0)})
        dense[m] = (a1 @ b1) * (a2 @ b2) * (1.0 / RANK) * 0.01
        sd[key + ".hada_w1_a"] = a1 * 0.01
    m = MODULES[0]  # 64 x 64 = kron(4 x 4, 16 x 16)
    key = "lora_unet_" + m.replace(".", "_")
    for k in [k for k in sd if k.startswith(key)]:
        del sd[k]
    w1 = torch.randn(4, 4, generator=g)
    w2a, w2b = torch.randn(16, 2, generator=g), torch.randn(2, 16, generator=g)
    sd.update({key + ".lokr_w1": w1, key + ".lokr_w2_a": w2a, key + ".lokr_w2_b": w2b, key + ".alpha": torch.tensor(1.0)})
    dense[m] = torch.kron(w1, w2a @ w2b) * 0.5
    path = tmp_path / "lycoris.safetensors"
    save_file(sd, str(path))
    return path, dense


def test_loha_and_lokr_full_rank_and_budget(tmp_path, shapes, reg_settings, base_ref):
    path, dense = _loha_lokr(tmp_path, shapes)
    rep = do_import(path, "imp-lyco", reg_settings, base_ref, rank=9999, conv_rank=9999)
    assert rep.converted == 3 and "loha" in rep.source_format and "lokr" in rep.source_format
    for m, d in dense.items():
        assert rel(imported_delta(rep.ref, reg_settings, m), d.reshape(d.shape[0], -1)) < 1e-5
    small = do_import(path, "imp-lyco-small", reg_settings, base_ref, budget="60KB", allow_duplicate=True)
    from lbm_registry.api.registry import resolve, show

    asset = resolve(small.ref, reg_settings)
    assert asset.path.stat().st_size <= 60_000
    rows = {r["module"]: r for r in show(small.ref, reg_settings)["layers"]}
    for m, d in dense.items():
        mat = d.reshape(d.shape[0], -1).double()
        s = torch.linalg.svdvals(mat)
        k = rows[m]["rank"]
        optimal = math.sqrt(float((s[k:] ** 2).sum() / (s**2).sum()))
        actual = rel(imported_delta(small.ref, reg_settings, m).double(), mat)
        assert actual <= optimal * 1.01 + 1e-4
        assert rows[m]["rel_error"] == pytest.approx(actual, rel=0.01, abs=1e-4)


@pytest.mark.parametrize("case", ["text_encoder", "unknown", "shape"])
def test_bad_files_refused_nothing_registered(tmp_path, factors, reg_settings, base_ref, case):
    from lbm_registry.errors import LoRAError

    m, (down, up) = next(iter(factors.items()))
    key = "lora_unet_" + m.replace(".", "_")
    sd = {key + ".lora_down.weight": down, key + ".lora_up.weight": up}
    if case == "text_encoder":
        sd["lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight"] = torch.zeros(4, 768)
        match = "text-encoder"
    elif case == "unknown":
        sd["lora_unet_down_blocks_7_attentions_0_proj_in.lora_down.weight"] = torch.zeros(4, 64)
        match = "the base lacks"
    else:
        sd[key + ".lora_up.weight"] = torch.zeros(up.shape[0] + 1, RANK)
        match = "delta, the base weight is"
    path = tmp_path / f"{case}.safetensors"
    save_file(sd, str(path))
    before = names(reg_settings)
    with pytest.raises(LoRAError, match=match):
        do_import(path, f"imp-bad-{case}", reg_settings, base_ref)
    assert names(reg_settings) == before


def test_cli_import_kind_lora(cli, tmp_path, factors, reg_settings, base_ref):
    sd = {}
    for m, (down, up) in factors.items():
        sd[f"{m}.lora_A.weight"] = down
        sd[f"{m}.lora_B.weight"] = up
    path = tmp_path / "plain_peft.safetensors"
    save_file(sd, str(path))
    rc, out, err = cli("--home", reg_settings.home, "import", path, "--kind", "lora", "--name", "imp-cli",
                       "--base", base_ref, "--json")
    assert rc == 0, err
    assert json.loads(out)["ref"] == "imp-cli@1"
    rc, out, err = cli("--home", reg_settings.home, "import", path, "--kind", "lora", "--name", "imp-cli",
                       "--base", base_ref)
    assert rc != 0 and "already registered as imp-cli@1" in err and "Traceback" not in err


def test_dora_and_full_diff_become_dense_deltas(tmp_path, factors, shapes, reg_settings, base_ref, tiny_base_path):
    from lbm_registry.lbm.checkpoint import CheckpointReader

    base = CheckpointReader(tiny_base_path)
    lin, ff = MODULES[0], MODULES[1]
    down, up = factors[lin]
    w0 = base.get(f"denoiser.{lin}.weight").float()
    g = torch.Generator().manual_seed(9)
    mag = torch.rand(w0.shape[0], generator=g) + 0.5
    merged = w0 + up @ down
    want_dora = merged * (mag / torch.linalg.vector_norm(merged, dim=1))[:, None] - w0
    diff = torch.randn(shapes[ff], generator=g) * 0.01
    sd = {f"{lin}.lora_A.weight": down, f"{lin}.lora_B.weight": up, f"{lin}.lora_magnitude_vector": mag}
    path = tmp_path / "dora.safetensors"
    save_file(sd, str(path))
    rep = do_import(path, "imp-dora", reg_settings, base_ref, rank=9999, conv_rank=9999)
    assert rep.converted == 1
    assert rel(imported_delta(rep.ref, reg_settings, lin), want_dora) < 1e-5
    path = tmp_path / "diff.safetensors"
    save_file({"lora_unet_" + ff.replace(".", "_") + ".diff": diff}, str(path))
    rep = do_import(path, "imp-diff", reg_settings, base_ref, rank=9999, conv_rank=9999)
    assert rep.source_format == "kohya+full"
    assert rel(imported_delta(rep.ref, reg_settings, ff), diff) < 1e-5


def test_a_file_of_ours_brings_its_base(cli, tmp_path, varied_tuned, extract_tiny, reg_settings, base_ref,
                                       fresh_settings):
    """Our own LoRA files (and their kohya exports) record their base's sha256: without --base,
    import uses it when it is registered here and says so; elsewhere it asks for --base, naming
    the hash it could not find."""
    from lbm_registry.api.assets.lora import export

    native = extract_tiny(varied_tuned, rank=4, conv_rank=2, dtype="fp32").path
    rc, out, err = cli("--home", reg_settings.home, "import", native, "--kind", "lora", "--name", "imp-own")
    assert rc == 0, err
    assert "note: base imp-base@1: the one the file records" in out
    from lbm_registry.api.registry import resolve

    assert resolve("imp-own@1", reg_settings).lineage["base"]["ref"] == "imp-base@1"
    kohya = tmp_path / "k.safetensors"
    export("imp-own@1", fmt="kohya", output=kohya, settings=reg_settings)
    rc, out, err = cli("--home", reg_settings.home, "import", kohya, "--kind", "lora", "--name", "imp-own-k")
    assert rc == 0 and "the one the file records" in out, err
    # the export names the version it was made from: the import links it (and is listed on its page)
    import json

    from safetensors import safe_open

    from lbm_registry.api.registry import show

    with safe_open(str(kohya), "np") as f:
        entry = json.loads(f.metadata()["lbm_registry"])
    assert entry["exported_from"] == {"ref": "imp-own@1", "sha256": resolve("imp-own@1", reg_settings).sha256}
    assert resolve("imp-own-k@1", reg_settings).lineage["parent"]["ref"] == "imp-own@1"
    assert [d["ref"] for d in show("imp-own@1", reg_settings)["descendants"]] == ["imp-own-k@1"]
    other = fresh_settings()
    rc, _, err = cli("--home", other.home, "import", native, "--kind", "lora", "--name", "x")
    assert rc == 2 and "needs --base REF" in err and "which is not registered here" in err, err
