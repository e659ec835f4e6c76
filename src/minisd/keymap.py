"""Declarative key-mapping tables between checkpoint layouts, and strict loading.

minisd's modules are named like the official CompVis/Stability single-file
checkpoints (`input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight`,
`encoder.down.0.block.1.nin_shortcut.weight`, open_clip's
`transformer.resblocks.0.attn.in_proj_weight`). An official file therefore
loads by a prefix strip. Every *other* layout (diffusers folders, the HF
transformers CLIP inside SD1/SDXL files) is a `KeyTable`: data, not code.

A table is a list of `Rule`s. Each rule makes one of *our* tensors from one or
more of *their* tensors through a named, invertible transform (`TRANSFORMS`),
e.g. HF CLIP's separate `q_proj/k_proj/v_proj` fused into open_clip's
`in_proj_weight`. Keys that are not weights (`position_ids`, `logit_scale`,
schedule buffers, ...) sit on an ignore list, each with its reason.

`KeyTable.to_ours` / `KeyTable.to_theirs` are total and strict: a key that is
missing or left over (and not ignored) raises `CheckpointError` naming it.
Tables know names, not shapes: `load_strict` then checks every shape against
the module before it assigns. There is no `.get()` of a weight anywhere.
"""

from __future__ import annotations

import contextlib
import fnmatch
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

# How many offending keys an error message lists before it summarises.
_SHOW = 12


class CheckpointError(ValueError):
    """A checkpoint does not fit the expected layout (missing, unexpected or misshapen keys,
    unreadable file, unknown architecture). Always names the file and the keys."""


# --------------------------------------------------------------------------- building on meta
# The in-place initialisers of torch.nn.init that layer constructors call (`reset_parameters`).
_INITS = ("uniform_", "normal_", "trunc_normal_", "constant_", "ones_", "zeros_", "kaiming_uniform_",
          "kaiming_normal_", "xavier_uniform_", "xavier_normal_", "orthogonal_")  # fmt: skip


@contextlib.contextmanager
def on_meta() -> Iterator[None]:
    """Build modules on the meta device without running their initialisers.

    Every layer's constructor draws its initial weights (`reset_parameters`: kaiming_uniform_ and
    friends). On meta that computes nothing, but each call still goes through torch's device mode:
    for SD1.5 that was about half of building the model (~0.15 s of a load). Weights built here are
    always assigned from a file afterwards (`load_strict(..., assign=True)`), so the initialisers are
    replaced by no-ops for the duration, as transformers' `no_init_weights` does. The swap is
    process-wide: do not initialise real weights in another thread meanwhile."""
    saved = {name: getattr(nn.init, name) for name in _INITS}
    try:
        for name in _INITS:
            setattr(nn.init, name, lambda tensor, *args, **kwargs: tensor)
        with torch.device("meta"):
            yield
    finally:
        for name, fn in saved.items():
            setattr(nn.init, name, fn)


# --------------------------------------------------------------------------- transforms
# name -> (forward: theirs -> ours, inverse: ours -> theirs). Each forward takes the
# list of foreign tensors named by the rule; each inverse returns that list.
def _cat0(ts: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat(ts, dim=0)


def _to_conv1x1(ts: list[torch.Tensor]) -> torch.Tensor:
    (w,) = ts
    return w[:, :, None, None] if w.dim() == 2 else w


TRANSFORMS: dict[
    str, tuple[Callable[[list[torch.Tensor]], torch.Tensor], Callable[[torch.Tensor, int], list[torch.Tensor]]]
] = {
    # one foreign tensor, same values and shape
    "identity": (lambda ts: ts[0], lambda t, n: [t]),
    # HF `nn.Linear.weight` (out, in) <-> open_clip raw matrix used as `x @ P` (in, out)
    "transpose": (lambda ts: ts[0].t().contiguous(), lambda t, n: [t.t().contiguous()]),
    # separate q, k, v projections <-> one fused `in_proj` (open_clip, nn.MultiheadAttention)
    "concat0": (_cat0, lambda t, n: [c.contiguous() for c in t.chunk(n, dim=0)]),
    # a linear weight (out, in) <-> a 1x1 convolution weight (out, in, 1, 1)
    "linear_to_conv1x1": (_to_conv1x1, lambda t, n: [t[:, :, 0, 0].contiguous()]),
}


@dataclass(frozen=True)
class Rule:
    """Our key `ours` is made from their keys `theirs` by `TRANSFORMS[transform]`."""

    ours: str
    theirs: tuple[str, ...]
    transform: str = "identity"

    def __post_init__(self) -> None:
        if self.transform not in TRANSFORMS:
            raise ValueError(f"unknown transform {self.transform!r} in rule for {self.ours!r}")


@dataclass(frozen=True)
class Ignore:
    """Foreign keys matching the fnmatch `pattern` are not weights of ours, for `reason`."""

    pattern: str
    reason: str


@dataclass(frozen=True)
class KeyTable:
    """A total, strict, invertible mapping between their layout and ours."""

    name: str
    rules: tuple[Rule, ...]
    ignore: tuple[Ignore, ...] = ()
    _by_ours: dict[str, Rule] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        by_ours: dict[str, Rule] = {}
        seen: set[str] = set()
        for r in self.rules:
            if r.ours in by_ours:
                raise ValueError(f"{self.name}: two rules make {r.ours!r}")
            for t in r.theirs:
                if t in seen:
                    raise ValueError(f"{self.name}: foreign key {t!r} is used by two rules")
                seen.add(t)
            by_ours[r.ours] = r
        object.__setattr__(self, "_by_ours", by_ours)

    # -- construction helpers
    @staticmethod
    def identity(name: str, keys: Iterable[str], ignore: Iterable[Ignore] = ()) -> KeyTable:
        """The table of a layout that already uses our names."""
        return KeyTable(name, tuple(Rule(k, (k,)) for k in keys), tuple(ignore))

    def prefixed(self, theirs_prefix: str, ours_prefix: str = "", name: str | None = None) -> KeyTable:
        """The same table with `theirs_prefix` before every foreign key (and pattern)
        and `ours_prefix` before every key of ours."""
        return KeyTable(
            name or f"{self.name} @ {theirs_prefix!r}",
            tuple(
                Rule(ours_prefix + r.ours, tuple(theirs_prefix + t for t in r.theirs), r.transform) for r in self.rules
            ),
            tuple(Ignore(theirs_prefix + i.pattern, i.reason) for i in self.ignore),
        )

    # -- queries
    @property
    def theirs_keys(self) -> list[str]:
        """Every key of the other layout the rules name, in rule order."""
        return [t for r in self.rules for t in r.theirs]

    def ignored_reason(self, key: str) -> str | None:
        """Why a foreign key is ignored, or None if it is not."""
        for i in self.ignore:
            if fnmatch.fnmatchcase(key, i.pattern):
                return i.reason
        return None

    # -- conversion
    def to_ours(
        self,
        theirs: Mapping[str, torch.Tensor],
        *,
        source: str = "state dict",
        ignored: dict[str, str] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Convert a foreign state dict into ours. Raises `CheckpointError` on any
        missing or unexpected foreign key. Ignored keys, with their reasons, are
        written into `ignored` when a dict is passed."""
        used = {t for r in self.rules for t in r.theirs}
        missing = [t for t in self.theirs_keys if t not in theirs]
        unexpected = []
        for k in theirs:
            if k in used:
                continue
            reason = self.ignored_reason(k)
            if reason is None:
                unexpected.append(k)
            elif ignored is not None:
                ignored[k] = reason
        if missing or unexpected:
            raise CheckpointError(_describe(f"{source} does not match the {self.name} layout", missing, unexpected, []))
        out: dict[str, torch.Tensor] = {}
        for r in self.rules:
            forward, _ = TRANSFORMS[r.transform]
            out[r.ours] = forward([theirs[t] for t in r.theirs])
        return out

    def to_theirs(self, ours: Mapping[str, torch.Tensor], *, source: str = "state dict") -> dict[str, torch.Tensor]:
        """The inverse of `to_ours` (ignored keys are not produced)."""
        missing = [k for k in self._by_ours if k not in ours]
        unexpected = [k for k in ours if k not in self._by_ours]
        if missing or unexpected:
            raise CheckpointError(
                _describe(f"{source} does not match minisd's side of {self.name}", missing, unexpected, [])
            )
        out: dict[str, torch.Tensor] = {}
        for r in self.rules:
            _, inverse = TRANSFORMS[r.transform]
            for t, v in zip(r.theirs, inverse(ours[r.ours], len(r.theirs)), strict=True):
                out[t] = v
        return out


def _describe(what: str, missing: list[str], unexpected: list[str], shapes: list[str]) -> str:
    lines = [what + ":"]
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", shapes)):
        if keys:
            more = f" (and {len(keys) - _SHOW} more)" if len(keys) > _SHOW else ""
            lines.append(f"  {len(keys)} {label}: " + ", ".join(keys[:_SHOW]) + more)
    lines.append(
        "  Check that the file is the model you meant (family, inpainting or not, base or refiner), "
        "or pass family=/config= to minisd.load to say which architecture it holds."
    )
    return "\n".join(lines)


def check_state_dict(module: nn.Module, state_dict: Mapping[str, torch.Tensor], *, source: str = "state dict") -> None:
    """Raise `CheckpointError` unless `state_dict` has exactly `module`'s keys and shapes.

    Works on modules built on the meta device (only shapes are compared)."""
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    shapes = [
        f"{k} (expected {expected[k]}, got {tuple(v.shape)})"
        for k, v in state_dict.items()
        if k in expected and tuple(v.shape) != expected[k]
    ]
    if missing or unexpected or shapes:
        raise CheckpointError(_describe(f"{source} does not fit {type(module).__name__}", missing, unexpected, shapes))


def load_strict(
    module: nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    *,
    source: str = "state dict",
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> nn.Module:
    """Check keys and shapes (see `check_state_dict`), then load with `assign=True`.

    The module may live on the meta device: the tensors are assigned, not copied, so
    no second copy of the weights is made. Floating tensors are cast to `dtype` once,
    here, when it is given; `device` moves them once."""
    check_state_dict(module, state_dict, source=source)
    sd = {}
    for k, v in state_dict.items():
        if dtype is not None and v.is_floating_point():
            v = v.to(dtype=dtype)
        if device is not None:
            v = v.to(device=device)
        sd[k] = v
    module.load_state_dict(sd, strict=True, assign=True)
    return module
