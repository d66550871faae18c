"""Serving by name: the registry wired to :mod:`lbm_registry.serve` (which knows no registry).

``Server`` is the in-process server (no HTTP): the same LoRA cache, batcher and mixed-LoRA
passes as ``lbm-reg serve``::

    with Server(base="lbm-base@1") as srv:
        result = srv.run(png_bytes, lora="relight@prod", scale=0.8, seed=3)

Each request resolves its references through the registry (so ``relight@prod`` follows the
alias when it moves), checks that the LoRA was made for the served base (else
:class:`BaseMismatchError`: HTTP 409) and, the first time a LoRA's bytes are loaded, verifies
the blob's sha256 against the catalog. Only registered references are served: a request never
names a file on the server's disk.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from lbm_registry.errors import BaseMismatchError, DataError, RefError, RegistryError
from lbm_registry.serve.engine import Engine, LoRASource, ServeOptions
from lbm_registry.settings import WorkspaceSettings

if TYPE_CHECKING:
    from lbm_registry.api.registry import ResolvedAsset
    from lbm_registry.lora.format import LoRAFile

SERVABLE_REF_RE = re.compile(r"(?:[A-Za-z0-9][A-Za-z0-9._-]{0,127}(?:@[A-Za-z0-9._-]{1,128})?|sha256:[0-9a-fA-F]{8,64})")


class RegistryResolver:
    """``ref -> LoRASource`` through the registry, for LoRAs of one base."""

    def __init__(self, settings: WorkspaceSettings, base: ResolvedAsset) -> None:
        self.settings = settings
        self.base = base

    def __call__(self, ref: str) -> LoRASource:
        from lbm_registry.api.registry import resolve
        from lbm_registry.api.run.infer import base_mismatch
        from lbm_registry.registry.refs import shown

        ref = str(ref).strip()
        if not SERVABLE_REF_RE.fullmatch(ref):  # never a path: a client names registered LoRAs only
            name, sep, selector = ref.partition("@")
            if sep and not selector and SERVABLE_REF_RE.fullmatch(name):
                from lbm_registry.registry.refs import nothing_after_at

                raise nothing_after_at(ref, name)
            raise RefError(f"{shown(ref)} is not a registered reference (NAME, NAME@VERSION|ALIAS or sha256:PREFIX)")
        asset = resolve(ref, self.settings, layers=False)
        if asset.kind == "file":
            raise RefError(f"unknown reference {shown(ref)}: not a registered LoRA")
        if asset.kind != "lora":
            raise DataError(f"{ref} is a {asset.kind} ({asset.ref}), not a LoRA")
        msg = base_mismatch(asset, self.base)
        if msg:
            raise BaseMismatchError(f"{msg}, the base this server holds")
        return LoRASource(ref=asset.label, sha256=asset.sha256, load=lambda: _verified_lora(asset),
                          size=int((asset.facts or {}).get("size") or asset.path.stat().st_size), path=asset.path)


def _verify_sha(asset: ResolvedAsset) -> None:
    from lbm_registry.registry.blobs import sha256_file

    got = sha256_file(asset.path)
    if got != asset.sha256:
        raise RegistryError(f"{asset.label}: its blob's sha256 is {got[:12]}, the catalog says "
                            f"{asset.sha256[:12]} (run 'lbm-reg doctor')")


def _verified_lora(asset: ResolvedAsset) -> LoRAFile:
    """Read a LoRA blob after checking its bytes are the registered ones (once per cache load)."""
    from lbm_registry.lora.format import read_lora

    _verify_sha(asset)
    return read_lora(asset.path)


def pick_base(base: str | None, preload: Sequence[str], settings: WorkspaceSettings) -> ResolvedAsset:
    """``--base``; else the base of the first preloaded LoRA; else the registry's only base."""
    from lbm_registry.api.registry import list_assets, resolve
    from lbm_registry.api.run.infer import _kind, _lora_base_sha

    if base is not None:
        asset = resolve(base, settings)
        if _kind(asset) == "lora":
            raise RefError(f"--base {base}: is a LoRA, not a base model")
        return asset
    if preload:
        lora = resolve(preload[0], settings)
        sha = _lora_base_sha(lora) if lora.kind in ("lora", "file") else None
        if not sha:
            raise RefError(f"{preload[0]}: records no base; pass --base REF")
        try:
            return resolve(f"sha256:{sha}", settings)
        except RefError:
            raise RefError(f"{preload[0]}: its base sha256:{sha[:12]} is not in this registry; pass --base REF") from None
    bases = list_assets(settings, kind="base")
    if len(bases) == 1:
        return resolve(bases[0]["name"], settings)
    names = ", ".join(b["name"] for b in bases[:5])
    raise RefError("pass --base REF: " + (f"the registry has {len(bases)} bases ({names})" if bases
                                          else "the registry has no base"))


class Server(Engine):
    """One warm base from the registry, LoRAs by reference, batched; usable without HTTP.

    ``preload``: LoRAs loaded (and, with ``pin_preload``, pinned) before the first request.
    Options: see :class:`lbm_registry.serve.engine.ServeOptions` (``max_loras``, ``max_batch``,
    ``max_wait_ms``, ``max_queue``, ``max_pixels``, ``max_steps``).
    """

    def __init__(self, base: str | None = None, *, preload: Sequence[str] = (), pin_preload: bool = False,
                 device: str = "auto", dtype: str = "auto", settings: WorkspaceSettings | None = None,
                 **options: Any) -> None:
        from lbm_registry.api.run.infer import config_for
        from lbm_registry.lbm.loading import load_lbm
        from lbm_registry.lbm.model import pick_device, pick_dtype

        settings = settings or WorkspaceSettings.resolve()
        base_asset = pick_base(base, preload, settings)
        if base_asset.kind != "file":
            _verify_sha(base_asset)
        cfg = config_for(base_asset)
        dev = pick_device(device)
        dt = pick_dtype(dtype, dev)
        model = load_lbm(base_asset.path, cfg, device=dev, dtype=dt)
        super().__init__(model, RegistryResolver(settings, base_asset), device=dev, dtype=dt,
                         options=ServeOptions(**options),
                         base={"ref": base_asset.label, "sha256": base_asset.sha256})
        self.settings = settings
        try:
            for ref in preload:
                self.load_lora(ref, pin=pin_preload or None)
        except BaseException:
            self.close()
            raise
