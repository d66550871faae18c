"""rm REF [--force]: guarded by aliases and descendants, atomic, doctor clean after."""

from __future__ import annotations

import pytest
from fixtures.registry import lora_facts, write_weights


@pytest.fixture
def chain(fresh_settings, tmp_path):
    """base@1; l@1 (alias prod), l@2 whose parent is l@1; dup@1 with the same bytes as l@2."""
    from lbm_registry.api.registry import register_asset, set_alias

    s = fresh_settings()
    base = register_asset(write_weights(tmp_path / "b.safetensors", 1), name="rm-base", kind="base", settings=s)
    l1 = register_asset(write_weights(tmp_path / "l1.safetensors", 2), name="l", kind="lora", settings=s,
                        facts=lora_facts(4), lineage={"base": base})
    l2_file = write_weights(tmp_path / "l2.safetensors", 3)
    l2 = register_asset(l2_file, name="l", kind="lora", settings=s, facts=lora_facts(4),
                        lineage={"base": base, "parent": l1})
    register_asset(l2_file, name="dup", kind="lora", settings=s, facts=lora_facts(4), lineage={"base": base})
    set_alias(l1.ref, "prod", s)
    return s, base, l1, l2


def test_rm_guards_force_and_doctor_clean(chain):
    from lbm_registry.api.registry import doctor, lineage_tree, remove, remove_alias, resolve, show
    from lbm_registry.errors import RefError, RegistryError

    s, base, l1, l2 = chain
    with pytest.raises(RegistryError, match=r"alias l@prod points at it"):
        remove("l@1", settings=s)
    remove_alias("l", "prod", s)
    with pytest.raises(RegistryError, match=r"l@2 \(parent\) names it"):
        remove("l@1", settings=s)
    with pytest.raises(RegistryError, match=r"l@1 \(base\), l@2 \(base\) name it in lineage"):
        remove("rm-base", settings=s)
    assert resolve("l@1", s).sha256 == l1.sha256  # nothing changed
    out = remove("l@1", force=True, settings=s)
    assert out["detached"] == ["l@2"] and out["blob_deleted"]
    assert any("model version" in m for m in out["mlflow"])
    with pytest.raises(RefError):
        resolve("l@1", s)
    assert not l1.path.exists()
    assert lineage_tree("l@2", s)["node"]["ref"] == "l@2"
    assert show("l@2", s)["lineage"]["parent"]["sha256"] == l1.sha256  # the edge keeps the hash
    # l@2 shares its bytes with dup@1: the blob stays
    out = remove("l", settings=s)
    assert out["ref"] == "l@2" and not out["blob_deleted"]
    assert resolve("dup", s).path.exists()
    report = doctor(s)
    assert report["ok"], report["issues"]
    assert not report["issues"], report["issues"]


def test_cli_rm_one_line(cli, chain):
    s, *_ = chain
    rc, out, err = cli("--home", s.home, "rm", "l@1")
    assert rc != 0 and "refusing to remove l@1" in err and "Traceback" not in err
    rc, out, err = cli("--home", s.home, "rm", "nope@1")
    assert rc != 0 and "Traceback" not in err
    rc, out, err = cli("--home", s.home, "rm", "l@1", "--force")
    assert rc == 0 and "removed l@1" in out
