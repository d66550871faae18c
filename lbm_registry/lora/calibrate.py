"""Calibration statistics: the second moment ``C = X X^T / n`` of every LoRA-able layer's inputs.

Collected with forward pre-hooks while the model translates calibration images the way
inference does (VAE-encode the source, run the bridge sampler from ``z_src`` at ``t = 1000``
for the configured number of steps), so each layer sees the inputs it sees in use. Linear
layers contribute their input vectors; Conv2d layers their unfolded patches (``C * kh * kw``
values per output position, in the weight's own (channel, row, column) order), so that
``||(dW - BA) X||`` is exactly the conv's output error.

Which model runs: the TUNED one. The LoRA is applied to the base, and base + LoRA is built to
behave like the tuned model, so the inputs that ``BA`` meets at inference are (close to) the
tuned model's activations, not the base's; the base's differ by the fine-tune's effect on all
the layers before. (benchmarks/extract.py measures both.)

Layers fed the very same tensor (``to_q``/``to_k``/``to_v`` of an attention block) share one
statistic: groups are found with a small probe forward pass (identity of the input tensors).

Memory: a ``full`` statistic costs ``4 d^2`` bytes, a ``diag`` one ``4 d``. Groups take
``full`` in order of increasing ``d`` while the total stays within ``memory`` (default 3 GB) and
``d <= full_max_dim``; the rest are ``diag``. Narrow first because a statistic's cost grows as
``d^2`` while the number of layers it serves does not: the narrow groups are most of the layers.
On the tiny twin everything is ``full`` (0.15 GB); at full LBM size (24 GB if all were full) the
default keeps every input up to 2880 wide full (all attention projections and 1x1 convs, the
320-channel 3x3 convs: 703 of 792 layers, 2.96 GB) and sends the 5120-wide feed-forward outputs
(``ff.net.2``) and the 3x3 convs of 1280+ input channels to ``diag``.

File: a safetensors file (reproducible bytes: :func:`lbm_registry.lbm.checkpoint.save_safetensors`)
with one fp32 tensor per group, ``<group>.full`` (the lower triangle of the symmetric d x d
matrix, row by row: half the bytes) or ``<group>.diag`` (d,), and a
``lbm_calibration`` metadata entry (format, groups with members/mode/n, and the provenance the
caller adds: model hashes, the calibration inputs' hashes, resolution, steps).
"""

from __future__ import annotations

import json
import math
import weakref
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lbm_registry.errors import LoRAError
from lbm_registry.lora.whiten import InputStats, StatsMode

META_KEY = "lbm_calibration"
FORMAT_VERSION = 1
DEFAULT_MEMORY = 3 * 10**9
FULL_MAX_DIM = 8192
"""Above this many inputs a full statistic is not used whatever the budget: its Cholesky
(d^3 / 3) and the product dW L (m d^2) would cost more than the whole plain extraction."""


@dataclass
class GroupStats:
    """One statistic: the modules that share it, its mode, ``n`` input vectors, ``moment`` (C)."""

    members: list[str]
    mode: StatsMode
    n: int
    moment: torch.Tensor

    @property
    def dim(self) -> int:
        return int(self.moment.shape[0])


@dataclass
class CalibrationStats:
    """Statistics of every calibrated layer, by group (named after its first member)."""

    groups: dict[str, GroupStats]
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._member = {m: g for g, gs in self.groups.items() for m in gs.members}

    # StatsSource
    def group_of(self, module: str) -> str | None:
        return self._member.get(module)

    def stats(self, group: str) -> InputStats:
        g = self.groups[group]
        return InputStats(g.mode, g.moment, g.n)

    def modes(self) -> dict[str, int]:
        """Layers per mode."""
        out: dict[str, int] = {}
        for g in self.groups.values():
            out[g.mode] = out.get(g.mode, 0) + len(g.members)
        return out

    def header(self) -> dict[str, Any]:
        return {"format": FORMAT_VERSION,
                "groups": {g: {"members": gs.members, "mode": gs.mode, "n": gs.n, "dim": gs.dim}
                           for g, gs in self.groups.items()},
                "info": self.info}

    def save(self, dest: str | Path) -> Path:
        """Write the statistics atomically, with reproducible bytes."""
        from lbm_registry.lbm.checkpoint import save_safetensors

        tensors = {f"{g}.{gs.mode}": pack(gs.moment) for g, gs in self.groups.items()}
        meta = {META_KEY: json.dumps(self.header(), sort_keys=True, separators=(",", ":"))}
        return save_safetensors(tensors, dest, meta)


class StatsFile:
    """A statistics file read one group at a time (a StatsSource): extraction streams it, so
    only the statistics of the layers in flight are in memory."""

    def __init__(self, path: str | Path) -> None:
        from lbm_registry.lbm.checkpoint import CheckpointReader

        self.path = Path(path)
        try:
            self.reader = CheckpointReader(self.path)
            raw = (self.reader.metadata or {}).get(META_KEY)
            header = json.loads(raw) if raw else None
        except LoRAError:
            raise
        except Exception as exc:   # CheckpointError, JSON: one line naming the file
            raise LoRAError(f"{self.path}: not a calibration statistics file ({str(exc).splitlines()[0]})") from None
        if not isinstance(header, dict) or header.get("format") != FORMAT_VERSION or "groups" not in header:
            raise LoRAError(f"{self.path}: not a calibration statistics file (no {META_KEY} entry of format "
                            f"{FORMAT_VERSION})")
        self.header = header
        self.info: dict[str, Any] = dict(header.get("info") or {})
        self.groups: dict[str, dict[str, Any]] = header["groups"]
        self._member = {m: g for g, spec in self.groups.items() for m in spec["members"]}
        for g, spec in self.groups.items():
            key = f"{g}.{spec['mode']}"
            if key not in self.reader:
                raise LoRAError(f"{self.path}: statistics of {g} are missing ({key})")

    def group_of(self, module: str) -> str | None:
        return self._member.get(module)

    def stats(self, group: str) -> InputStats:
        spec = self.groups[group]
        return InputStats(spec["mode"], self._moment(group), int(spec["n"]))

    def _moment(self, group: str) -> torch.Tensor:
        spec = self.groups[group]
        raw = self.reader.read(f"{group}.{spec['mode']}").float()
        d = int(spec["dim"])
        want = d * (d + 1) // 2 if spec["mode"] == "full" else d
        if raw.ndim != 1 or raw.numel() != want:
            raise LoRAError(f"{self.path}: statistics of {group} have {raw.numel()} values, expected {want}")
        return unpack(raw, d) if spec["mode"] == "full" else raw

    def modes(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for spec in self.groups.values():
            out[spec["mode"]] = out.get(spec["mode"], 0) + len(spec["members"])
        return out

    def load(self) -> CalibrationStats:
        """Everything in memory (tests, small models)."""
        groups = {g: GroupStats(list(spec["members"]), spec["mode"], int(spec["n"]), self._moment(g))
                  for g, spec in self.groups.items()}
        return CalibrationStats(groups, dict(self.info))


def pack(moment: torch.Tensor) -> torch.Tensor:
    """A symmetric matrix's lower triangle, row by row (a diagonal passes through), fp32 CPU."""
    m = moment.detach().float().cpu()
    if m.ndim == 1:
        return m.contiguous()
    rows, cols = torch.tril_indices(m.shape[0], m.shape[0])
    return m[rows, cols].contiguous()


def unpack(values: torch.Tensor, d: int) -> torch.Tensor:
    """The symmetric d x d matrix :func:`pack` stored (a mask scatter, then the mirror: half the
    time of two index scatters, which a full-size extraction does 512 times)."""
    out = torch.zeros(d, d, dtype=values.dtype)
    out.masked_scatter_(torch.ones(d, d, dtype=torch.bool).tril_(), values)
    out += out.T.triu(1)
    return out


# -- which layers get which statistic --------------------------------------------------------
def input_dim(module: nn.Module) -> int:
    if isinstance(module, nn.Conv2d):
        return module.in_channels // module.groups * math.prod(module.kernel_size)
    return int(module.weight.shape[1])


def plan_modes(dims: Mapping[str, int], memory: int = DEFAULT_MEMORY,
               full_max_dim: int = FULL_MAX_DIM) -> dict[str, StatsMode]:
    """``full`` for the narrowest groups while their ``4 d^2`` bytes fit ``memory`` (and
    ``d <= full_max_dim``), ``diag`` for the rest. Deterministic (ties by name)."""
    out: dict[str, StatsMode] = {}
    used = sum(4 * d for d in dims.values())   # every group's diagonal, the floor
    for name in sorted(dims, key=lambda g: (dims[g], g)):
        d = dims[name]
        extra = 4 * d * d - 4 * d
        if d <= full_max_dim and used + extra <= memory:
            out[name] = "full"
            used += extra
        else:
            out[name] = "diag"
    return {name: out[name] for name in dims}


def layer_inputs(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The (n, d) matrix of input vectors a Linear / Conv2d multiplies its weight with."""
    if isinstance(module, nn.Conv2d):
        if module.kernel_size == (1, 1) and module.stride == (1, 1) and module.padding in ((0, 0), "valid"):
            return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])
        if isinstance(module.padding, str):
            raise LoRAError(f"calibration of convolutions with padding={module.padding!r} is not supported")
        cols = torch.nn.functional.unfold(x, module.kernel_size, dilation=module.dilation, padding=module.padding,
                                          stride=module.stride)
        return cols.transpose(1, 2).reshape(-1, cols.shape[1])
    return x.reshape(-1, x.shape[-1])


class StatsCollector:
    """Forward pre-hooks that accumulate each layer's input second moment (a context manager).

    ``layers``: module name -> Linear/Conv2d of the denoiser. Groups come from :meth:`discover`
    (one probe forward pass); accumulators live on the layers' device, in fp32.
    """

    def __init__(self, denoiser: nn.Module, layers: Mapping[str, nn.Module], *, memory: int = DEFAULT_MEMORY,
                 full_max_dim: int = FULL_MAX_DIM) -> None:
        self.denoiser = denoiser
        self.layers = dict(layers)
        self.memory = memory
        self.full_max_dim = full_max_dim
        self.group: dict[str, str] = {}                  # module -> group
        self.members: dict[str, list[str]] = {}          # group -> modules
        self.modes: dict[str, StatsMode] = {}
        self._acc: dict[str, torch.Tensor] = {}
        self._n: dict[str, int] = {}
        self._seen: dict[int, tuple[weakref.ref, str]] = {}
        self._handles: list[Any] = []
        self._discovering = False

    def __enter__(self) -> StatsCollector:
        self._handles.append(self.denoiser.register_forward_pre_hook(lambda *_: self._seen.clear()))
        for name, module in self.layers.items():
            self._handles.append(module.register_forward_pre_hook(self._hook(name)))
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._seen.clear()

    def _hook(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0]
            prior = self._seen.get(id(x))
            same = prior is not None and prior[0]() is x
            if self._discovering:
                if same:
                    self.group[name] = prior[1]
                    self.members[prior[1]].append(name)
                else:
                    self.group[name] = name
                    self.members[name] = [name]
                    self._seen[id(x)] = (weakref.ref(x), name)
                return
            group = self.group.get(name)
            if group is None:
                return
            if group != name:   # a follower: its leader already counted this very tensor
                if not same or prior[1] != group:
                    raise LoRAError(f"calibration: {name} no longer shares its input with {group}")
                return
            self._seen[id(x)] = (weakref.ref(x), name)
            self._accumulate(group, layer_inputs(module, x.detach()))
        return hook

    def discover(self, probe: Callable[[], Any]) -> None:
        """Run ``probe`` (one small forward pass) to find which layers share an input, then plan
        the statistics' modes and allocate them."""
        self._discovering = True
        try:
            with torch.no_grad():
                probe()
        finally:
            self._discovering = False
            self._seen.clear()
        missing = [n for n in self.layers if n not in self.group]
        if missing:
            raise LoRAError(f"calibration: {len(missing)} layers never ran in a forward pass (first: {missing[0]})")
        dims = {g: input_dim(self.layers[g]) for g in self.members}
        self.modes = plan_modes(dims, self.memory, self.full_max_dim)
        for g, d in dims.items():
            dev = self.layers[g].weight.device
            shape = (d, d) if self.modes[g] == "full" else (d,)
            self._acc[g] = torch.zeros(shape, dtype=torch.float32, device=dev)
            self._n[g] = 0

    def _accumulate(self, group: str, xs: torch.Tensor) -> None:
        xs = xs.float()
        acc = self._acc[group]
        if acc.ndim == 2:
            acc.addmm_(xs.T, xs)
        else:
            acc.add_((xs * xs).sum(0))
        self._n[group] += int(xs.shape[0])

    def result(self, info: Mapping[str, Any] | None = None) -> CalibrationStats:
        groups = {}
        for g, members in self.members.items():
            n = self._n.get(g, 0)
            if n == 0:
                raise LoRAError(f"calibration: no inputs reached {g}")
            moment = (self._acc[g] / n).cpu()
            if moment.ndim == 2:
                moment = (moment + moment.T) / 2   # exactly symmetric
            groups[g] = GroupStats(list(members), self.modes[g], n, moment)
        return CalibrationStats(groups, dict(info or {}))


# -- running the model ------------------------------------------------------------------------
def probe_input(model: Any, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A small latent and sigma for the group-discovery pass (sides divisible by every
    down-sampling), in ``dtype`` (default: the denoiser's parameters')."""
    p = next(model.denoiser.parameters())
    dtype = dtype or p.dtype
    levels = len(model.config.denoiser.block_out_channels)
    side = 2 ** max(levels, 2)
    x = torch.zeros(1, model.config.denoiser.in_channels, side, side, dtype=dtype, device=p.device)
    x[:, :, ::2, ::3] = 1.0   # any non-degenerate input
    return x, torch.ones(1, dtype=dtype, device=p.device)


def collect_stats(model: Any, images: Iterable[torch.Tensor], *, steps: int | None = None,
                  memory: int = DEFAULT_MEMORY, full_max_dim: int = FULL_MAX_DIM, seed: int = 0,
                  layers: Mapping[str, nn.Module] | None = None, info: Mapping[str, Any] | None = None,
                  progress: Callable[[int], None] | None = None, dtype: torch.dtype | None = None) -> CalibrationStats:
    """Translate each image (B, 3, h, w in [-1, 1], on the model's device, in the dtype the model
    computes in) as inference does — encode, then ``steps`` bridge steps from ``z_src`` at sigma 1
    (t = 1000), bridge noise seeded by ``seed`` and the image's position — and return every
    layer's input statistics. ``dtype``: the dtype the model computes in, when it is not that of
    its parameters (a model kept in bf16 and run under
    :func:`lbm_registry.lbm.upcast.compute_in` computes in fp32).

    ``progress(i)`` after image ``i`` (1-based).
    """
    from lbm_registry.lbm.model import weight_layers
    from lbm_registry.lbm.sampler import sample

    cfg = model.config
    steps = steps or cfg.inference.steps
    targets = dict(layers) if layers is not None else weight_layers(model.denoiser)
    collector = StatsCollector(model.denoiser, targets, memory=memory, full_max_dim=full_max_dim)
    with collector, torch.no_grad():
        x0, s0 = probe_input(model, dtype)
        collector.discover(lambda: model.velocity(x0, s0))
        for i, img in enumerate(images, 1):
            gen = torch.Generator(device=img.device).manual_seed(seed * 1_000_003 + i)
            z_src = model.vae.encode(img)
            sample(model.velocity, z_src, steps=steps, bridge_noise_sigma=cfg.bridge.bridge_noise_sigma,
                   generator=gen)
            if progress:
                progress(i)
    return collector.result(info)
