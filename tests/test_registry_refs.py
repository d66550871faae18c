"""Registration, lineage, every reference form, aliases, dedup, facts updates, MLflow mirror."""

from __future__ import annotations

import os
import stat

import pytest

from lbm_registry.api import registry as R
from lbm_registry.errors import RefError, RegistryError


def test_versions_and_lineage(populated):
    s, l1, l2 = populated["settings"], populated["l1"], populated["l2"]
    assert (l1.name, l1.version, l2.version) == ("relight", 1, 2)
    assert l1.kind == "lora" and l1.path.is_file()
    assert l1.facts["base_sha256"] == populated["base"].sha256
    assert l1.facts["tuned_sha256"] == populated["tuned"].sha256
    assert l1.lineage["base"] == {"sha256": populated["base"].sha256, "ref": "sdxl-base@1", "registered": True}
    assert l1.lineage["tuned"]["ref"] == "tuned@1"
    # lineage given as a bare sha256 of a registered version is linked to that version
    assert l2.lineage["base"]["ref"] == "sdxl-base@1"
    assert l2.lineage["parent"] == {"sha256": l1.sha256, "ref": "relight@1", "registered": True}
    assert l2.lineage["datasets"][0]["sha256"] == "ab" * 32
    assert l2.lineage["training_config"] == {"max_steps": 10}
    assert [r["module"] for r in l1.facts["layers"]] == ["a", "b"] and l1.facts["created_at"]
    assert R.layer_table(l1, s)[0] == {"module": "a", "kind": "linear", "shape": "32x32", "rank": 4,
                                       "rel_error": 0.01, "energy": 0.99}
    tree = R.lineage_tree("relight@2", s)
    roles = {e["role"]: e for e in tree["up"]}
    assert roles["parent"]["ref"] == "relight@1"
    assert {e["role"] for e in roles["parent"]["up"]} == {"base", "tuned"}
    down = R.lineage_tree("sdxl-base", s)["down"]
    assert [d["ref"] for d in down] == ["relight@1"]  # relight@2 shows under its parent only
    assert [d["ref"] for d in down[0]["down"]] == ["relight@2"]


def test_every_reference_form(populated, tmp_path):
    s, l1, l2 = populated["settings"], populated["l1"], populated["l2"]
    cases = {
        "relight": 2, "relight@latest": 2, "relight@1": 1, "relight@v1": 1, "relight@V2": 2,
        "relight@prod": 1, f"sha256:{l1.sha256[:8]}": 1, f"sha256:{l2.sha256.upper()[:12]}": 2,
        f"sha256:{l2.sha256}": 2,
    }
    for ref, version in cases.items():
        a = R.resolve(ref, s)
        assert (a.name, a.version) == ("relight", version), ref
        assert a.sha256 == (l1 if version == 1 else l2).sha256
    # a path to an unregistered file: kind "file", hashed
    f = tmp_path / "loose.safetensors"
    f.write_bytes(b"x" * 100)
    a = R.resolve(str(f), s)
    assert a.kind == "file" and a.path == f.absolute() and a.name is None
    import hashlib

    assert a.sha256 == hashlib.sha256(b"x" * 100).hexdigest()


def test_bare_versions_are_relative(populated):
    s, l1, l2 = populated["settings"], populated["l1"], populated["l2"]
    assert R.resolve("v1", s, relative_to=l2).ref == "relight@1"
    assert R.resolve("2", s, relative_to=l1).ref == "relight@2"
    # without relative_to: the only LoRA asset
    assert R.resolve("v1", s).ref == "relight@1"
    with pytest.raises(RefError, match="no version 7"):
        R.resolve("v7", s, relative_to=l1)


def test_kinds_filter(populated):
    s = populated["settings"]
    assert R.resolve("sdxl-base", s, kinds=("base",)).kind == "base"
    with pytest.raises(RefError, match="is a lora.*expected a base or model"):
        R.resolve("relight", s, kinds=("base", "model"))


@pytest.mark.parametrize("ref,message", [
    ("relite", r"unknown reference 'relite'.*did you mean relight\?"),
    ("relite@2", r"unknown asset 'relite'; did you mean relight\?"),
    ("relight@9", r"relight has no version 9 \(versions: 1, 2\)"),
    ("relight@prd", r"relight has no alias 'prd'; did you mean prod\?"),
    ("sha256:1234", r"at least 8 hex"),
    ("sha256:0000000000", r"no registered version has sha256"),
    ("missing/file.safetensors", r"file not found"),
])
def test_unknown_references_are_one_line_with_suggestions(populated, ref, message):
    with pytest.raises(RefError, match=message) as exc:
        R.resolve(ref, populated["settings"])
    assert "\n" not in str(exc.value)


def test_ambiguous_hash_prefix(reg_settings, make_weights):
    """Two files whose hashes share 8 hex digits cannot be made on demand, so the catalog rows of
    two registered versions get hashes with a common prefix. Blob paths follow the hash, so the
    real blobs are linked under the fake hashes too (resolution size-checks the blob)."""
    import os

    from lbm_registry.registry.blobs import blob_path
    from lbm_registry.registry.workspace import Workspace

    a = R.register_asset(make_weights(), name="amb", kind="base", settings=reg_settings)
    b = R.register_asset(make_weights(), name="amb", kind="base", settings=reg_settings)
    fake_a, fake_b = "deadbeef01" + "0" * 54, "deadbeef02" + "0" * 54
    with Workspace.open(reg_settings) as ws, ws.db.transaction() as tx:
        tx.execute("UPDATE versions SET sha256 = :s WHERE sha256 = :o", {"s": fake_a, "o": a.sha256})
        tx.execute("UPDATE versions SET sha256 = :s WHERE sha256 = :o", {"s": fake_b, "o": b.sha256})
        fakes = [blob_path(ws.blobs_dir, fake) for fake in (fake_a, fake_b)]
        for real, fake in zip((a.sha256, b.sha256), fakes, strict=True):
            fake.parent.mkdir(parents=True, exist_ok=True)
            os.link(blob_path(ws.blobs_dir, real), fake)
    try:
        with pytest.raises(RefError, match="sha256:deadbeef is ambiguous .2 hashes"):
            R.resolve("sha256:deadbeef", reg_settings)
        assert R.resolve("sha256:deadbeef01", reg_settings).ref == "amb@1"
    finally:
        with Workspace.open(reg_settings) as ws, ws.db.transaction() as tx:
            tx.execute("UPDATE versions SET sha256 = :o WHERE sha256 = :s", {"s": fake_a, "o": a.sha256})
            tx.execute("UPDATE versions SET sha256 = :o WHERE sha256 = :s", {"s": fake_b, "o": b.sha256})
        for fake in fakes:
            fake.unlink()
    assert R.resolve(f"sha256:{a.sha256[:8]}", reg_settings).ref == "amb@1"


def test_aliases(populated):
    s = populated["settings"]
    assert R.set_alias("relight@2", "staging", s)["version"] == 2
    assert R.resolve("relight@staging", s).version == 2
    moved = R.set_alias("relight@1", "staging", s)
    assert moved["previous"] == 2 and R.resolve("relight@staging", s).version == 1
    assert R.show("relight@1", s)["aliases"] == ["prod", "staging"]
    R.remove_alias("relight", "staging", s)
    with pytest.raises(RefError, match="no alias 'staging'"):
        R.resolve("relight@staging", s)
    with pytest.raises(RefError, match="has no alias"):
        R.remove_alias("relight", "staging", s)
    for reserved in ("latest", "v3", "3", "V10"):
        with pytest.raises(RegistryError, match="reserved"):
            R.set_alias("relight@1", reserved, s)
    with pytest.raises(RegistryError, match="invalid alias"):
        R.set_alias("relight@1", "a/b", s)
    # @latest / @N / @vN still resolve
    assert R.resolve("relight@latest", s).version == 2


def test_names_validated(reg_settings, make_weights):
    for bad in ("a/b", "../x", "x\ny", "", "v2", "12", "-x", "a b"):
        with pytest.raises(RegistryError, match="invalid name"):
            R.register_asset(make_weights(), name=bad, kind="base", settings=reg_settings)


def test_lora_needs_base_and_kinds_are_fixed(reg_settings, make_weights):
    with pytest.raises(RegistryError, match="must name its base"):
        R.register_asset(make_weights(), name="nobase", kind="lora", settings=reg_settings, facts={"rank": 1})
    R.register_asset(make_weights(), name="kinded", kind="base", settings=reg_settings)
    with pytest.raises(RegistryError, match="is a base"):
        R.register_asset(make_weights(), name="kinded", kind="model", settings=reg_settings)
    with pytest.raises(RegistryError, match="unknown kind"):
        R.register_asset(make_weights(), name="kinded2", kind="checkpoint", settings=reg_settings)
    assert R.resolve("kinded", reg_settings).version == 1  # the refused ones left nothing visible


def test_dedup_one_blob_copied(reg_settings, make_weights, tmp_path):
    src = make_weights(seed=4242)
    src_mode = stat.S_IMODE(os.stat(src).st_mode)
    copy = tmp_path / "copy.safetensors"
    copy.write_bytes(src.read_bytes())
    a = R.register_asset(src, name="dup-a", kind="base", settings=reg_settings)
    b = R.register_asset(copy, name="dup-b", kind="model", settings=reg_settings)
    c = R.register_asset(copy, name="dup-a", kind="base", settings=reg_settings)
    assert a.sha256 == b.sha256 == c.sha256 and a.path == b.path == c.path
    assert c.version == 2
    blobs = [p for p in reg_settings.blobs_dir.rglob("*") if p.is_file() and p.name == a.sha256]
    assert len(blobs) == 1
    st = a.path.stat()
    assert not stat.S_IMODE(st.st_mode) & 0o222  # the blob is read-only...
    assert st.st_ino != os.stat(src).st_ino  # ...and a copy: the user's file is not the blob
    assert stat.S_IMODE(os.stat(src).st_mode) == src_mode  # registering left the user's file alone
    assert os.stat(src).st_nlink == 1
    assert a.path.relative_to(reg_settings.blobs_dir).parts == (a.sha256[:2], a.sha256)
    # the first registration wins for sha256: refs
    assert R.resolve(f"sha256:{a.sha256[:10]}", reg_settings).ref == "dup-a@1"


def test_hash_cache_skips_rehash(reg_settings, tmp_path, monkeypatch):
    f = tmp_path / "big.safetensors"
    f.write_bytes(os.urandom(4096))
    first = R.resolve(str(f), reg_settings).sha256
    import lbm_registry.registry.refs as refs_mod

    def boom(path):
        raise AssertionError("rehashed a cached file")

    monkeypatch.setattr(refs_mod, "sha256_file", boom)
    assert R.resolve(str(f), reg_settings).sha256 == first
    f.write_bytes(os.urandom(4096))  # new mtime: the cache must not answer
    monkeypatch.undo()
    assert R.resolve(str(f), reg_settings).sha256 != first


def test_background_digest_hashes_from_an_offset_and_stops_when_cancelled(tmp_path):
    """BackgroundDigest: the same digest as sha256_file (from any offset), on a thread named
    lbm-hash; cancel() ends it at the next chunk (shown on a pipe, which blocks between chunks)."""
    import hashlib
    import threading

    from lbm_registry.registry.blobs import BackgroundDigest, DigestCancelled, sha256_file

    f = tmp_path / "data.bin"
    data = os.urandom(3 * 1024 * 1024 + 17)
    f.write_bytes(data)
    assert BackgroundDigest(f).result() == sha256_file(f) == hashlib.sha256(data).hexdigest()
    assert BackgroundDigest(f, offset=1000).result() == hashlib.sha256(data[1000:]).hexdigest()
    assert BackgroundDigest(f).stat == (f.stat().st_size, f.stat().st_mtime_ns)

    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    writer = threading.Thread(target=lambda: _feed(fifo))
    writer.start()
    digest = BackgroundDigest(fifo)
    assert any(t.name == "lbm-hash" for t in threading.enumerate())
    _FED.wait(5)
    digest.cancel()
    _GO.set()
    with pytest.raises(DigestCancelled):
        digest.result()
    writer.join(5)
    assert not any(t.name == "lbm-hash" for t in threading.enumerate())


_FED, _GO = __import__("threading").Event(), __import__("threading").Event()


def _feed(fifo):
    import time

    with open(fifo, "wb", buffering=0) as w:
        w.write(b"x" * 1024)
        time.sleep(0.2)           # the reader has hashed the first chunk and waits for more
        _FED.set()
        _GO.wait(5)
        w.write(b"y" * 1024)      # it reads this, sees the cancel, and stops


def test_hash_cache_keeps_no_hash_of_a_file_changed_while_hashing(reg_settings, tmp_path):
    """A hash is remembered under the (size, mtime) the file had when hashing *started*: a
    file written meanwhile gets no cache entry (its new stamp would otherwise vouch for old
    bytes). Tensor-bytes hashes live beside file hashes under their own key."""
    from lbm_registry.registry import refs
    from lbm_registry.registry.workspace import Workspace

    f = tmp_path / "w.safetensors"
    f.write_bytes(b"a" * 100)
    st = f.stat()
    ws = Workspace.open_existing(reg_settings)
    try:
        refs.remember_file_sha256(ws, f, (st.st_size, st.st_mtime_ns - 1), "0" * 64)   # stale stamp
        assert refs.cached_file_sha256(ws, f) is None
        refs.remember_file_sha256(ws, f, (st.st_size, st.st_mtime_ns), "1" * 64)
        refs.remember_file_sha256(ws, f, (st.st_size, st.st_mtime_ns), "2" * 64, tensors=True)
        assert refs.cached_file_sha256(ws, f) == "1" * 64
        assert refs.cached_file_sha256(ws, f, tensors=True) == "2" * 64
        os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
        assert refs.cached_file_sha256(ws, f) is None and refs.cached_file_sha256(ws, f, tensors=True) is None
    finally:
        ws.close()


def test_update_facts_records_validation(populated):
    s, l1 = populated["settings"], populated["l1"]
    asset = R.resolve("relight@1", s)
    R.update_facts(asset, {"functional_error": 0.0123, "validation": {"passed": True, "images": 3}}, s,
                   metrics={"validate_seconds": 2.5})
    assert asset.facts["functional_error"] == 0.0123
    again = R.resolve("relight@1", s)
    assert again.facts["functional_error"] == 0.0123 and again.facts["validation"]["passed"] is True
    assert again.facts["rank"] == 4  # merged, not replaced
    shown = R.show("relight@1", s)
    assert shown["lora"]["functional_error"] == 0.0123
    from mlflow import MlflowClient

    run = MlflowClient(tracking_uri=s.effective_tracking_uri).get_run(shown["mlflow"]["run_id"])
    assert run.data.metrics["functional_error"] == pytest.approx(0.0123)
    assert run.data.metrics["validate_seconds"] == pytest.approx(2.5)
    with pytest.raises(RegistryError, match="not a registered version"):
        R.update_facts(R.ResolvedAsset(ref="x", path=l1.path, sha256=l1.sha256, kind="file"), {"a": 1}, s)


def test_mlflow_mirror_is_searchable(populated):
    from mlflow import MlflowClient

    s, base, l1, l2 = populated["settings"], populated["base"], populated["l1"], populated["l2"]
    client = MlflowClient(tracking_uri=s.effective_tracking_uri)
    found = {int(mv.version): mv for mv in client.search_model_versions("name = 'relight'")}
    assert len(found) == 2
    shown = {n: R.show(f"relight@{n}", s) for n in (1, 2)}
    for info in shown.values():
        mv = found[int(info["mlflow"]["model_version"])]
        assert mv.tags["x-lbm.sha256"] == info["sha256"]
        assert mv.tags["x-lbm.base_sha256"] == base.sha256
        assert mv.run_id == info["mlflow"]["run_id"]
    by_sha = client.search_model_versions(f"tags.`x-lbm.sha256` = '{l2.sha256}'")
    assert [mv.name for mv in by_sha] == ["relight"]
    assert by_sha[0].tags["x-lbm.parent_ref"] == "relight@1"
    run = client.get_run(shown[1]["mlflow"]["run_id"])
    assert run.info.experiment_id == client.get_experiment_by_name("lbm-registry").experiment_id
    assert run.data.params["rank"] == "4" and run.data.params["policy"] == "fixed"
    assert run.data.params["base"] == "sdxl-base@1" and run.data.params["tuned"] == "tuned@1"
    assert run.data.metrics["mean_error"] == pytest.approx(0.04)
    assert run.data.metrics["extract_seconds"] == pytest.approx(1.5)
    assert run.data.tags["lbm.tuned_sha256"] == populated["tuned"].sha256
    names = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"weights", "layers.csv", "layers.json", "layers.txt", "facts.json", "lineage.json"} <= names
    weights = next(a for a in client.list_artifacts(run.info.run_id, "weights") if a.path.endswith(".safetensors"))
    local = s.home / "artifacts" / run.info.run_id / "artifacts" / weights.path
    assert local.stat().st_ino == l1.path.stat().st_ino  # a hard link to the blob
    assert not local.is_symlink()
    assert (local.parent.parent / "layers.txt").read_text().splitlines() == ["a", "b"]
    assert str(client.get_model_version_by_alias("relight", "prod").version) == shown[1]["mlflow"]["model_version"]


def test_list_and_show(populated):
    s = populated["settings"]
    rows = {r["name"]: r for r in R.list_assets(s)}
    assert rows["relight"]["latest"] == 2 and rows["relight"]["versions"] == 2
    assert rows["relight"]["aliases"]["prod"] == 1
    assert rows["sdxl-base"]["kind"] == "base"
    assert {r["name"] for r in R.list_assets(s, kind="lora")} >= {"relight"}
    assert all(r["kind"] == "lora" for r in R.list_assets(s, kind="lora"))
    info = R.show("relight@2", s)
    assert info["lineage"]["parent"]["ref"] == "relight@1"
    assert info["tags"] == {"team": "vision"}
    assert R.show("relight@1", s)["descendants"][0]["ref"] == "relight@2"
    assert len(info["layers"]) == 2 and info["lora"]["rank"] == 8


# -- hostile references (issue 22, items 6 and 18) -------------------------------------------
HUGE = "99999999999999999999999"   # > 2**63: an OverflowError in the catalog's driver


@pytest.mark.parametrize("ref", [f"relight@{HUGE}", f"relight@v{HUGE}", f"relight@{'9' * 400}"])
def test_versions_past_2_63_are_unknown_versions(populated, ref):
    with pytest.raises(RefError, match="relight has no version 9+.* \\(versions: 1, 2\\)"):
        R.resolve(ref, populated["settings"])
    with pytest.raises(RefError, match="relight has no version"):
        R.resolve(ref.split("@")[1], populated["settings"], relative_to=populated["l1"])   # compare A vN


@pytest.mark.parametrize("args", [["show", f"relight@{HUGE}"], ["lineage", f"relight@{HUGE}"],
                                  ["rm", f"relight@{HUGE}"], ["alias", "set", f"relight@{HUGE}", "x"],
                                  ["infer", f"relight@{HUGE}", "--source", "nope.png", "--output", "o.png"],
                                  ["show", "a" * 5000], ["show", "relight@" + "b" * 5000], ["rm", "a" * 5000],
                                  ["infer", "a" * 5000, "--source", "nope.png", "--output", "o.png"],
                                  ["show", "~no-such-user-here/x.safetensors"], ["show", "a\x01b"]],
                         ids=lambda a: " ".join(x[:20] for x in a))
def test_hostile_references_are_one_short_line_exit_2(cli, populated, args):
    """A version over 2**63 was a traceback; a 5000-character reference "File name too long"
    with exit 1, echoed whole; an unknown ~user a RuntimeError."""
    rc, out, err = cli("--home", populated["settings"].home, *args)
    assert rc == 2, err
    assert len(err.strip().splitlines()) == 1 and len(err) < 400 and "Traceback" not in err, err


def test_long_names_are_abbreviated_in_name_errors():
    from lbm_registry.registry.refs import name_problem

    why = name_problem("a" * 5000 + "!")
    assert "'!' not allowed" in why and "(5001 characters)" in why and len(why) < 300
