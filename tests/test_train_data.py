"""Training inputs: synthetic shards, the shard reader, bad samples, config validation, LPIPS."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest

from lbm_registry.errors import ConfigError, DataError

pytestmark = pytest.mark.usefixtures("train_threads")


def _tar(path: Path, entries: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in entries.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def _jpeg(color=(200, 30, 30), size=(40, 30)) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="JPEG")
    return buf.getvalue()


def test_synth_writes_readable_deterministic_shards(tmp_path):
    from lbm_registry.registry.blobs import sha256_file
    from lbm_registry.train.data import PairStream, expand_shards
    from lbm_registry.train.synth import shard_pattern, write_synth_shards

    a = write_synth_shards(tmp_path / "a", 5, resolution=32, seed=7, shard_size=2)
    b = write_synth_shards(tmp_path / "b", 5, resolution=32, seed=7, shard_size=2)
    c = write_synth_shards(tmp_path / "c", 5, resolution=32, seed=8, shard_size=2)
    assert [p.name for p in a] == ["synth-000.tar", "synth-001.tar", "synth-002.tar"]
    assert [sha256_file(p) for p in a] == [sha256_file(p) for p in b]  # same seed, same bytes
    assert sha256_file(a[0]) != sha256_file(c[0])
    with tarfile.open(a[0]) as tar:
        assert tar.getnames() == ["000000.source.jpg", "000000.target.jpg", "000001.source.jpg", "000001.target.jpg"]
    assert expand_shards([shard_pattern(a)]) == a
    pairs = list(PairStream(a, resolution=32, shuffle=False).pairs())
    assert [k for _, k, _, _ in pairs] == [f"{i:06d}" for i in range(5)]
    _, _, src, tgt = pairs[0]
    assert src.shape == tgt.shape == (3, 32, 32)
    assert -1 <= float(src.min()) and float(src.max()) <= 1
    assert not bool((src == tgt).all())  # relit: target differs from source


def test_data_synth_cli(tmp_path):
    from lbm_registry.cli.main import main

    main(["data", "synth", "--output", str(tmp_path), "--n", "3", "--resolution", "32", "--shard-size", "2",
          "--prefix", "val"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["val-000.tar", "val-001.tar"]


@pytest.mark.parametrize(("args", "needle"), [
    (["--resolution", "100000"], "resolution must be from 8 to 4096 pixels, got 100000"),
    (["--resolution", "4"], "resolution must be from 8 to 4096"),
    (["--seed", "-1"], "seed must be from 0 to 2**63-1"),
])
def test_data_synth_refuses_out_of_range_numbers_creating_nothing(cli, tmp_path, args, needle):
    """``--resolution 100000`` tried a 74.5 GiB allocation and left an empty output folder."""
    rc, _, err = cli("data", "synth", "--output", tmp_path / "out", "--n", "1", *args)
    assert rc == 2 and needle in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


def test_shards_brace_expansion_and_missing(tmp_path):
    from lbm_registry.train.data import expand_shards

    for i in range(3):
        (tmp_path / f"s-{i:03d}.tar").write_bytes(b"")
    assert len(expand_shards([str(tmp_path / "s-{000..002}.tar")])) == 3
    with pytest.raises(DataError, match=r"shard not found: .*s-003.tar \(from"):
        expand_shards([str(tmp_path / "s-{000..003}.tar")])
    with pytest.raises(DataError, match=r"shard not found: .*s-003.tar \(from .*; --validation-shards overrides it\)"):
        expand_shards([str(tmp_path / "s-{000..003}.tar")], "validation_shards")


def test_stream_order_is_seeded_and_resumable(synth_shards):
    from lbm_registry.train.data import PairStream

    def keys(seed, epoch, start=0):
        s = PairStream(synth_shards["train"], resolution=32, shuffle_buffer=3, seed=seed)
        return [k for _, k, _, _ in s.pairs(epoch, start)]

    full = keys(0, 0)
    assert sorted(full) == [f"{i:06d}" for i in range(8)]
    assert keys(0, 0) == full
    assert keys(0, 1) != full or keys(1, 0) != full  # reshuffled per epoch / seed
    assert keys(0, 0, start=5) == full[5:]


def test_shared_sample_webp_in_jpg_decodes(shared_sample):
    if shared_sample is None:
        pytest.skip("../shared/data/relight_sample is not present")
    from lbm_registry.train.data import PairStream

    pairs = list(PairStream([shared_sample / "train_single.tar"], resolution=64, shuffle=False).pairs())
    assert len(pairs) == 1 and pairs[0][2].shape == (3, 64, 64) and pairs[0][3].shape == (3, 64, 64)


def test_bad_samples_error_or_skip(tmp_path):
    from lbm_registry.train.data import PairStream

    shard = _tar(tmp_path / "bad.tar", {
        "a.source.jpg": _jpeg(), "a.target.jpg": _jpeg((0, 0, 200)),
        "b.source.jpg": _jpeg(),                                      # target missing
        "c.source.jpg": _jpeg(), "c.target.jpg": b"not an image at all",
        "d.source.jpg": _jpeg(), "d.target.jpg": _jpeg((0, 200, 0)),
    })
    with pytest.raises(DataError) as exc:
        list(PairStream([shard], resolution=32, shuffle=False).pairs())
    msg = str(exc.value)
    assert "bad.tar" in msg and "'b'" in msg and "target.jpg" in msg and "\n" not in msg

    warnings: list[str] = []
    stream = PairStream([shard], resolution=32, shuffle=False, on_bad_sample="skip", warn=warnings.append)
    assert [k for _, k, _, _ in stream.pairs()] == ["a", "d"]
    assert stream.skipped == 2 and len(warnings) == 2
    assert "lacks 'target.jpg'" in warnings[0] and "unreadable image" in warnings[1]
    assert all("\n" not in w for w in warnings)

    with pytest.raises(DataError, match=r"sample 'a' lacks 'src.png' \(has: source.jpg, target.jpg\)"):
        list(PairStream([shard], resolution=32, shuffle=False, source_key="src.png").pairs())


def test_corrupt_shard_fails_one_line(tmp_path):
    from lbm_registry.train.data import PairStream

    good = _tar(tmp_path / "good.tar", {"a.source.jpg": _jpeg(), "a.target.jpg": _jpeg()})
    data = good.read_bytes()
    broken = tmp_path / "broken.tar"
    broken.write_bytes(data[:700] + b"\xff" * 300)
    with pytest.raises(DataError) as exc:
        list(PairStream([broken], resolution=32, shuffle=False).pairs())
    assert "broken.tar" in str(exc.value) and "\n" not in str(exc.value)
    stream = PairStream([broken, good], resolution=32, shuffle=False, on_bad_sample="skip")
    assert [k for _, k, _, _ in stream.pairs()] == ["a"]


def test_config_validation_and_overrides(tmp_path):
    from lbm_registry.train.config import load_train_config, parse_set_option, train_config_from_dict

    base = {"base": "b", "lora": "l", "train_shards": "x.tar"}
    cfg = train_config_from_dict(base)
    assert cfg.train_shards == ["x.tar"] and cfg.trainable_lora_modules == ["*"]
    with pytest.raises(ConfigError, match="learning_rte: unknown field"):
        train_config_from_dict({**base, "learning_rte": 1})
    with pytest.raises(ConfigError, match="exactly one of 'lora'"):
        train_config_from_dict({"base": "b", "train_shards": ["x"]})
    with pytest.raises(ConfigError, match="optimizer"):
        train_config_from_dict({**base, "optimizer": "adam"})
    with pytest.raises(ConfigError, match="sum to 1"):
        train_config_from_dict({**base, "timesteps": [250, 500], "timestep_probabilities": [0.5, 0.6]})
    over = train_config_from_dict({**base, "new_lora": None}, {"max_steps": 7, "pixel_loss.kind": "l1",
                                                               "register": "relight", "model_config": "lbm-tiny"})
    assert over.max_steps == 7 and over.pixel_loss.kind == "l1" and over.register_name == "relight"
    assert over.to_dict()["model_config"] == "lbm-tiny"
    # --lora on the command line wins over a config that starts a new LoRA
    swapped = train_config_from_dict({"base": "b", "new_lora": {"rank": 2}, "train_shards": ["x"]}, {"lora": "r"})
    assert swapped.lora == "r" and swapped.new_lora is None
    assert parse_set_option(["pixel_loss.weight=0.5", "timesteps=[250, 500]"]) == {
        "pixel_loss.weight": 0.5, "timesteps": [250, 500]}
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_set_option(["oops"])
    shipped = load_train_config(Path(__file__).resolve().parents[1] / "configs" / "lora-finetune.yaml")
    assert shipped.base and shipped.lora and shipped.optimizer == "adamw"
    bad = tmp_path / "bad.yaml"
    bad.write_text("base: b\nlora: l\ntrain_shards: [x]\nbatch_size: -1\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: batch_size"):
        load_train_config(bad)


def test_lpips_needs_cached_backbone(monkeypatch, tmp_path):
    import torch

    from lbm_registry.train.losses import build_pixel_loss, lpips_backbone_file

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    assert lpips_backbone_file("alex").parent == tmp_path / "hub" / "checkpoints"
    with pytest.raises(ConfigError, match="backbone weights cached at .*nothing is downloaded"):
        build_pixel_loss("lpips")
    loss = build_pixel_loss("lpips", lpips_random_backbone=True)
    a, b = torch.rand(1, 3, 64, 64) * 2 - 1, torch.rand(1, 3, 64, 64) * 2 - 1
    assert float(loss(a, b)) > 0 and float(loss(a, a)) == pytest.approx(0.0, abs=1e-6)
    assert not list((tmp_path / "hub").rglob("*.pth"))  # nothing was downloaded


def test_lpips_loads_backbone_from_cache_without_network(monkeypatch, tmp_path):
    """A torchvision-format file in the hub cache is mapped onto LPIPS's trunk exactly."""
    import torch
    from torchvision.models import alexnet

    from lbm_registry.train.losses import LPIPSLoss, lpips_backbone_file

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    net = alexnet(weights=None)
    dest = lpips_backbone_file("alex")
    dest.parent.mkdir(parents=True)
    torch.save(net.state_dict(), dest)
    loss = LPIPSLoss("alex")
    assert torch.equal(loss.model.net.slice1.get_submodule("0").weight, net.features[0].weight)
    assert torch.equal(loss.model.net.slice5.get_submodule("10").bias, net.features[10].bias)


def test_module_patterns_fnmatch_regex_and_typos():
    from lbm_registry.errors import LoRAError
    from lbm_registry.train.inject import match_modules

    names = ["down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q", "conv_in",
             "up_blocks.0.resnets.0.conv1", "mid_block.attentions.0.proj_out"]
    assert match_modules(names, ["*attn1.to_q", "conv_in"]) == names[:2]
    assert match_modules(names, ["re:.*resnets\\.\\d+\\.conv1", "denoiser.mid_block.*"]) == names[2:]
    # plain names are substrings (the original config's "attn1", "up_blocks"); globs/regexes whole names
    assert match_modules(names, ["attn1"]) == names[:1]
    assert match_modules(names, ["up_blocks", "proj_out"]) == names[2:]
    with pytest.raises(LoRAError, match=r"pattern '\*attn1' matches no module"):
        match_modules(names, ["*attn1"])  # a glob is anchored
    with pytest.raises(LoRAError, match="pattern 're:resnets' matches no module"):
        match_modules(names, ["re:resnets"])  # a regex must match the whole name
    with pytest.raises(LoRAError, match="pattern 'attn3' matches no module"):
        match_modules(names, ["attn3"])
    with pytest.raises(LoRAError, match="bad regular expression"):
        match_modules(names, ["re:("])


def test_default_run_folder_lives_in_the_workspace(tmp_path):
    from lbm_registry.api.train import run_folder
    from lbm_registry.errors import TrainingError
    from lbm_registry.settings import WorkspaceSettings
    from lbm_registry.train.config import load_train_config

    settings = WorkspaceSettings.resolve(home=tmp_path)
    cfg = load_train_config("lora-finetune", {"register": "relight"})  # a built-in name works
    assert cfg.output_dir is None
    first = run_folder(cfg, settings, resume=False)
    assert first.parent == tmp_path / "training" and first.name.startswith("relight-")
    with pytest.raises(TrainingError, match="nothing to resume: no 'relight' run"):
        run_folder(cfg, settings, resume=True)
    (first / "checkpoints" / "step-00000002").mkdir(parents=True)
    (first / "checkpoints" / "step-00000002" / "state.json").write_text("{}")
    assert run_folder(cfg, settings, resume=True) == first
    assert run_folder(cfg, settings, resume=False) != first  # a new run never reuses a folder
    explicit = load_train_config("lora-finetune", {"output_dir": str(tmp_path / "mine")})
    assert run_folder(explicit, settings, resume=True) == tmp_path / "mine"


def test_a_shard_named_twice_is_one_dataset_in_the_lineage(tmp_path):
    """Training and validating on the same shard records it once (``lineage`` listed it twice)."""
    import hashlib

    from lbm_registry.train.data import shard_hashes

    a, b = tmp_path / "a.tar", tmp_path / "b.tar"
    a.write_bytes(b"first")
    b.write_bytes(b"second")
    rows = shard_hashes([a, b, tmp_path / "." / "a.tar"])
    assert rows == [{"path": str(a.resolve()), "sha256": hashlib.sha256(b"first").hexdigest()},
                    {"path": str(b.resolve()), "sha256": hashlib.sha256(b"second").hexdigest()}]


def test_entries_named_without_extension_match_any_image_extension(tmp_path):
    """upstream's configs name entries `source_image` / `target_image`: any image extension matches;
    a list of names takes the first present (the original relighting shards hold `source.jpg`)."""
    from lbm_registry.train.data import PairStream

    shard = _tar(tmp_path / "up.tar", {
        "a.source_image.png": _jpeg(), "a.target_image.webp": _jpeg((0, 0, 200)),
        "b.source_image.jpg": _jpeg(), "b.target_image.jpeg": _jpeg((0, 200, 0)),
        "c.source.jpg": _jpeg(), "c.target.jpg": _jpeg((9, 9, 9)), "c.json": b"{}",
    })
    stream = PairStream([shard], resolution=32, shuffle=False, source_key=["source_image", "source.jpg"],
                        target_key=["target_image", "target"], on_bad_sample="skip")
    assert [k for _, k, _, _ in stream.pairs()] == ["a", "b", "c"]
    with pytest.raises(DataError, match=r"sample 'c' lacks 'source_image' \(has: json, source.jpg, target.jpg\)"):
        list(PairStream([shard], resolution=32, shuffle=False, source_key="source_image",
                        target_key="target_image").pairs())


def test_non_square_resolution_and_aspect_buckets(tmp_path, pair_shard):
    """`resolution: [H, W]` covers and centre-crops to H x W; with buckets each sample goes to the
    bucket nearest its source's aspect ratio (EXIF rotation included) and each group of `global
    batch` consecutive positions shares one bucket, the same grouping for every seed's order."""
    import torch
    from PIL import Image

    from lbm_registry.train.data import PairStream

    wide, tall = (96, 32), (32, 96)
    shard = pair_shard(tmp_path / "mixed.tar", [wide] * 5 + [tall] * 3 + [(64, 64)])
    fixed = PairStream([shard], resolution=(32, 64), shuffle=False)
    assert {tuple(s.shape) for _, _, s, _ in fixed.pairs()} == {(3, 32, 64)}

    buckets = [(32, 96), (96, 32), (64, 64)]
    stream = PairStream([shard], resolution=64, buckets=buckets, shuffle_buffer=4, seed=3)
    stream.group_size = 4
    order = stream.order(0)
    assert sorted(r.key for r in order) == [f"{i:04d}" for i in range(9)]
    bounds, start = [], 0
    while start < len(order):
        n = stream.step_size(0, start, 4)
        bounds.append(n)
        assert len({stream.sample_size(r) for r in order[start:start + n]}) == 1, start
        start += n
    assert sorted(bounds) == [1, 1, 3, 4] and stream.steps_per_epoch(0, 4) == 4  # wide 4 + 1, tall 3, square 1
    assert {tuple(s.shape[1:]) for _, _, s, _ in stream.pairs()} == {(32, 96), (96, 32), (64, 64)}
    assert [b.source.shape[0] for b in stream.batches(4)] == bounds  # validation batches keep to one size

    buf = io.BytesIO()  # a portrait photo stored landscape with EXIF orientation 6 (rotate 90)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (96, 32), (9, 90, 200)).save(buf, format="JPEG", exif=exif)
    rotated = _tar(tmp_path / "exif.tar", {"r.source.jpg": buf.getvalue(), "r.target.jpg": buf.getvalue()})
    s = PairStream([rotated], resolution=64, buckets=buckets, shuffle=False)
    assert s.sample_size(s.order(0)[0]) == (96, 32)
    assert next(s.pairs())[2].shape == torch.Size([3, 96, 32])
