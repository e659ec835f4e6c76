"""LoRA and LyCORIS (LoHa, LoKr) adapters: read a file, check it against the model, apply it.

Each adapter layer changes one weight W of the model by a scaled low-rank (or structured) delta
(docs/lora.md has the equations and the formats):

    LoRA / LoCon  W' = W + s * (alpha / r) * up @ down                 (Hu et al. 2021, eq. 3)
    LoHa          W' = W + s * (alpha / r) * (w1a @ w1b) * (w2a @ w2b)  (Hadamard product; FedPara)
    LoKr          W' = W + s * (alpha / r) * kron(w1, w2)               (alpha / r only when factorised)

with s the user's scale for that adapter. An adapter is applied in one of two ways:

- unfused (the default): the weights stay untouched, and forward hooks add the delta's product in
  the forward: `y + s * (alpha/r) * up(down(x))` for LoRA (the low-rank path, as peft does), or the
  rebuilt delta for LoHa / LoKr. minisd's text towers keep q/k/v fused in one `in_proj_weight`
  used by `F.linear`, not a module, so an adapter on it swaps in `W + delta` for the duration of
  the attention's forward and puts the original Parameter back after it;
- fused (`fuse`): W + delta is written once into new Parameters; the original Parameters are kept,
  and `unfuse` puts them back, so the weights are bit-identical afterwards (subtracting the delta
  again would not be: fp32 addition is not invertible). Fusing costs one copy of each changed weight.

The names a file gives its layers are matched through `lora_formats.lora_table`, a table
generated from the model's configs; nothing is guessed from patterns.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from .detection import PICKLE_SUFFIXES, open_regular, read_safetensors_header, refuse_pickle
from .keymap import CheckpointError
from .lora_formats import ROLES, UNET, LoraTarget, lora_table, made_for, model_made_for, split_key, what_it_is

if TYPE_CHECKING:
    from .model import StableDiffusion

logger = logging.getLogger(__name__)

_SHOW = 12  # keys an error lists before it summarises
# The parts each method needs (either alternative of a tuple), and may have.
_REQUIRED = {"lora": (("down",), ("up",)), "hada": (("w1a",), ("w1b",), ("w2a",), ("w2b",)),
             "lokr": (("w1", "w1a"), ("w2", "w2a"))}  # fmt: skip
_OPTIONAL = {"lora": ("mid",), "hada": ("t1", "t2"), "lokr": ("w1b", "w2b", "t2")}


class LoraError(CheckpointError):
    """A LoRA file that cannot be applied to this model; the message names the file and the keys."""


# ---------------------------------------------------------------------------------- the deltas
def _tucker(t: torch.Tensor, wa: torch.Tensor, wb: torch.Tensor) -> torch.Tensor:
    """The CP/Tucker rebuild of LoCon's `lora_mid` and LyCORIS' `hada_t*` / `lokr_t2` (A1111
    lyco_helpers.make_weight_cp): core t (r, r', kh, kw), wa (r, out), wb (r', in) -> (out, in, kh, kw)."""
    temp = torch.einsum("i j k l, j r -> i r k l", t, wb)
    return torch.einsum("i j k l, i r -> r j k l", temp, wa)


def lora_delta(parts: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """up @ down (LoRA; LoCon's conv down (r, in, kh, kw) with a 1x1 up: (out, in kh kw)), or the CP
    form with `mid`."""
    up, down = parts["up"], parts["down"]
    if "mid" in parts:  # A1111 network_lora: up (out, r, 1, 1), down (r', in, 1, 1), mid (r, r', kh, kw)
        return _tucker(parts["mid"], up.flatten(1).t(), down.flatten(1))
    return up.flatten(1) @ down.flatten(1)


def hada_delta(parts: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """(w1a @ w1b) * (w2a @ w2b), or with Tucker cores t1, t2 (A1111 network_hada)."""
    if "t1" in parts:
        w1 = _tucker(parts["t1"], parts["w1a"], parts["w1b"])
        w2 = _tucker(parts["t2"], parts["w2a"], parts["w2b"])
        return w1 * w2
    w1 = parts["w1a"].flatten(1) @ parts["w1b"].flatten(1)
    w2 = parts["w2a"].flatten(1) @ parts["w2b"].flatten(1)
    return w1 * w2


def lokr_delta(parts: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """kron(w1, w2), each factor whole or a low-rank product (A1111 network_lokr, make_kron).

    A conv factor w2 (out2, in2, kh, kw) is flattened to (out2, in2 kh kw): kron with the 2-D w1
    then lays the columns out as (in1, in2, kh, kw), the same tensor as A1111's 4-D kron."""
    w1 = parts["w1"] if "w1" in parts else parts["w1a"] @ parts["w1b"]
    if "w2" in parts:
        w2 = parts["w2"].flatten(1)
    elif "t2" in parts:
        w2 = _tucker(parts["t2"], parts["w2a"], parts["w2b"]).flatten(1)
    else:
        w2 = parts["w2a"] @ parts["w2b"].flatten(1)
    return torch.kron(w1, w2)


# method -> the delta at alpha / r = 1 in its own layout (rows = output features); the caller reshapes it.
DELTAS: dict[str, Callable[[Mapping[str, torch.Tensor]], torch.Tensor]] = {
    "lora": lora_delta, "hada": hada_delta, "lokr": lokr_delta,
}  # fmt: skip


def _rank(method: str, parts: Mapping[str, torch.Tensor]) -> int | None:
    """r of alpha / r (A1111: lora down.shape[0]; hada w1b.shape[0]; lokr w1b or w2b, else no scaling)."""
    if method == "lora":
        return parts["down"].shape[0]
    if method == "hada":
        return parts["w1b"].shape[0]
    for name in ("w1b", "w2b"):
        if name in parts:
            return parts[name].shape[0]
    return None


@dataclass(frozen=True)
class LoraLayer:
    """One layer of an adapter: the weight it changes, its method and parts, and alpha / r."""

    name: str  # the file's layer name
    target: LoraTarget
    method: str  # "lora", "hada" or "lokr"
    parts: dict[str, torch.Tensor]
    scale: float  # alpha / r (1 without alpha)

    def delta(self, shape: torch.Size) -> torch.Tensor:
        """The weight change at scale 1, (alpha / r) * rebuilt delta, in fp32."""
        parts = {k: v.float() for k, v in self.parts.items()}
        return DELTAS[self.method](parts).reshape(shape) * self.scale

    def forward(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """What this layer adds to `module(x)` at scale 1. LoRA runs its low-rank path
        (down, then up: r x (in + out) multiply-adds per position); the others the rebuilt delta."""
        if isinstance(module, nn.Linear):
            if self.method == "lora" and "mid" not in self.parts:
                down, up = self.parts["down"].flatten(1), self.parts["up"].flatten(1)
                return F.linear(F.linear(x, down), up) * self.scale
            return F.linear(x, self.delta(module.weight.shape).to(x.dtype))
        conv = dict(stride=module.stride, padding=module.padding, dilation=module.dilation)
        if self.method == "lora" and "mid" not in self.parts:
            down = self.parts["down"]
            down = down.reshape(down.shape[0], module.in_channels, *module.kernel_size)  # (r, in, kh, kw)
            up = self.parts["up"].reshape(-1, down.shape[0], 1, 1)
            return F.conv2d(F.conv2d(x, down, **conv), up) * self.scale
        return F.conv2d(x, self.delta(module.weight.shape).to(x.dtype), groups=module.groups, **conv)


@dataclass
class Adapter:
    """A loaded adapter: its layers and the user's scale s."""

    name: str
    source: str
    layers: tuple[LoraLayer, ...]
    scale: float


@dataclass
class LoraSet:
    """The adapters of one model, whether they are fused, and what undoing needs
    (the original Parameters while fused; the hook handles while unfused)."""

    adapters: dict[str, Adapter] = field(default_factory=dict)
    fused: bool = False
    originals: dict[tuple, nn.Parameter] = field(default_factory=dict)
    handles: list = field(default_factory=list)


# ---------------------------------------------------------------------------------- reading a file
def read_lora_file(path: str | Path, *, allow_pickle: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and safetensors metadata of a LoRA file (or of a diffusers LoRA folder's
    `pytorch_lora_weights.safetensors`). Pickles only with `allow_pickle` (`torch.load(weights_only=True)`)."""
    path = Path(path)
    if path.is_dir():
        path = path / "pytorch_lora_weights.safetensors"
    if path.suffix.lower() in PICKLE_SUFFIXES:
        if not allow_pickle:
            refuse_pickle(path)
        with open_regular(path) as f:
            try:
                obj = torch.load(f, map_location="cpu", weights_only=True)
            except Exception as e:  # UnpicklingError, RuntimeError for archives that are not torch's
                raise LoraError(f"{path}: refused to unpickle ({type(e).__name__})") from None
        if not isinstance(obj, dict):
            raise LoraError(f"{path}: expected a dict of tensors, got a {type(obj).__name__}")
        return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}, {}
    header = read_safetensors_header(path)  # CheckpointError naming the file for a missing or corrupt one
    return load_file(path), dict(header.metadata)


def _peft_scale(layer: str, rank: int, metadata: Mapping[str, str]) -> float:
    """alpha / r of a diffusers/PEFT layer without an `.alpha` tensor: diffusers' `lora_adapter_metadata`
    (the LoraConfig per component: `lora_alpha`, `alpha_pattern`, `use_rslora`), else alpha = r (scale 1,
    diffusers' default when a file carries no alphas)."""
    raw = metadata.get("lora_adapter_metadata")
    component, _, module = layer.partition(".")
    config = {k.removeprefix(component + "."): v for k, v in json.loads(raw).items()} if raw else {}
    if "lora_alpha" not in config:
        return 1.0
    alpha = float(config["lora_alpha"])
    for pattern, value in (config.get("alpha_pattern") or {}).items():
        if re.fullmatch(rf"(.*\.)?({pattern})", module):  # peft's rule (tuners_utils: get_pattern_key)
            alpha = float(value)
    return alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)


def _layer(name: str, roles: Mapping[str, torch.Tensor], target: LoraTarget, metadata: Mapping[str, str],
           where: str) -> LoraLayer:  # fmt: skip
    """One layer's parts checked for a single method with every part it needs."""
    methods = {ROLES[r][0] for r in roles} - {None}
    if len(methods) != 1:
        got = sorted(roles)
        raise LoraError(f"{where}: layer {name} has parts {got}: expected those of exactly one of lora, hada, lokr")
    (method,) = methods
    parts = {ROLES[r][1]: t for r, t in roles.items() if ROLES[r][0] == method}
    missing = [" or ".join(alt) for alt in _REQUIRED[method] if not any(a in parts for a in alt)]
    extra = sorted(set(parts) - {a for alt in _REQUIRED[method] for a in alt} - set(_OPTIONAL[method]))
    if missing or extra:
        raise LoraError(f"{where}: {method} layer {name} lacks {missing} / has unexpected {extra}")
    rank = _rank(method, parts)
    if "alpha" in roles and rank is not None:
        scale = float(roles["alpha"]) / rank
    elif rank is not None and not name.startswith("lora_"):
        scale = _peft_scale(name, rank, metadata)
    else:
        scale = 1.0  # A1111 calc_scale: no alpha (or an unfactorised LoKr) -> 1
    return LoraLayer(name, target, method, parts, scale)


def parse_lora(
    tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str], model: StableDiffusion, where: str
) -> tuple[LoraLayer, ...]:
    """The file's layers matched to the model's weights, strictly: a file for another family, unknown
    layers, keys with no role or deltas of the wrong shape raise `LoraError` naming them."""
    groups: dict[str, dict[str, torch.Tensor]] = {}
    no_role = []
    for key, tensor in tensors.items():
        split = split_key(key)
        if split is None:
            no_role.append(key)
        else:
            groups.setdefault(split[0], {})[split[1]] = tensor
    if not groups:
        raise LoraError(f"{where}: not a LoRA file: {what_it_is(list(tensors))}")
    table = lora_table(model.unet.config, [(e.config, s.diffusers_folder)
                                           for e, s in zip(model.text_encoders, model.family.text)])  # fmt: skip
    unknown = sorted(name for name in groups if name not in table)
    layers = [_layer(name, roles, table[name], metadata, where) for name, roles in groups.items() if name in table]
    wrong = [f"{lay.name} (delta {_delta_shape(lay)}, weight {_weight_shape(model, lay.target)})"
             for lay in layers if not _fits(_delta_shape(lay), _weight_shape(model, lay.target))]  # fmt: skip
    if unknown or wrong or no_role:
        _check_family(groups, model, where)
        _raise_listing(where, model, unknown, wrong, no_role)
    return tuple(layers)


def _module(model: StableDiffusion, target: LoraTarget) -> nn.Module:
    root = model.unet if target.component == UNET else model.text_encoders[int(target.component)]
    return root.get_submodule(target.module)


def _weight_shape(model: StableDiffusion, target: LoraTarget) -> tuple[int, ...]:
    shape = tuple(getattr(_module(model, target), target.param).shape)
    return shape if target.rows is None else (target.rows[1] - target.rows[0], *shape[1:])


def _delta_shape(layer: LoraLayer) -> tuple[int, ...] | str:
    """The shape of the layer's delta before it is reshaped to the weight's (rows = output features),
    computed on the meta device: no work, no memory."""
    meta = {k: torch.empty(v.shape, device="meta") for k, v in layer.parts.items()}
    try:
        return tuple(DELTAS[layer.method](meta).shape)
    except RuntimeError:
        return "parts that do not multiply: " + ", ".join(f"{k} {tuple(v.shape)}" for k, v in layer.parts.items())


def _fits(delta: tuple[int, ...] | str, weight: tuple[int, ...]) -> bool:
    """The delta reshapes to the weight: as many rows, as many elements (a (out, in) LoRA fits a 1x1 conv)."""
    return isinstance(delta, tuple) and delta[0] == weight[0] and math.prod(delta) == math.prod(weight)


def _check_family(groups: Mapping[str, Mapping[str, torch.Tensor]], model: StableDiffusion, where: str) -> None:
    """Refuse a file made for another family, naming both, before listing its keys one by one."""
    file = made_for(groups)
    ours = model_made_for(model.unet.config, len(model.text_encoders))
    differs = (file.context_width is not None and file.context_width != ours.context_width) or (
        file.text_encoders is not None and file.text_encoders != ours.text_encoders
    )
    if differs:
        raise LoraError(
            f"{where}: this LoRA was made for another model family ({file.describe()}); the loaded model is "
            f"{model.family.name} ({ours.describe()}). Load it on the model it was trained for."
        )


def _raise_listing(where: str, model: StableDiffusion, unknown: list, wrong: list, no_role: list) -> None:
    lines = [f"{where}: does not fit this {model.family.name} model:"]
    for label, keys in (("unknown layers", unknown), ("wrong shapes", wrong), ("keys of no LoRA kind", no_role)):
        if keys:
            more = f" (and {len(keys) - _SHOW} more)" if len(keys) > _SHOW else ""
            lines.append(f"  {len(keys)} {label}: " + ", ".join(keys[:_SHOW]) + more)
    lines.append("  Known layer names: kohya lora_unet_* / lora_te*_ and diffusers unet.* / text_encoder*.* "
                 "(see docs/lora.md); kinds: lora_down/up, lora_A/B, hada_*, lokr_*, alpha.")  # fmt: skip
    raise LoraError("\n".join(lines))


# ---------------------------------------------------------------------------------- applying
def _groups(model: StableDiffusion) -> dict[tuple, list[tuple[LoraLayer, float]]]:
    """(component, module, param) -> every (layer, user scale) that changes that parameter."""
    groups: dict[tuple, list[tuple[LoraLayer, float]]] = {}
    for adapter in model.loras.adapters.values():
        for layer in adapter.layers:
            t = layer.target
            groups.setdefault((t.component, t.module, t.param), []).append((layer, adapter.scale))
    return groups


def _changed(weight: torch.Tensor, entries: list[tuple[LoraLayer, float]]) -> torch.Tensor:
    """W + sum of s * delta over `entries` (row slices where a target has them), summed in fp32 and
    cast once to W's dtype."""
    merged = weight.detach().float().clone()
    for layer, s in entries:
        rows = layer.target.rows or (0, weight.shape[0])
        part = merged[rows[0] : rows[1]]
        part += s * layer.delta(part.shape).to(merged.device)
    return merged.to(weight.dtype)


def _output_hook(entries: list[tuple[LoraLayer, float]]) -> Callable:
    """A forward hook on a Linear / Conv2d: y + sum of s * layer(x)."""

    def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        for layer, s in entries:
            output = output + s * layer.forward(module, args[0])
        return output

    return hook


def _swap_hooks(owner: nn.Module, param: str, entries: list[tuple[LoraLayer, float]]) -> list:
    """For a parameter used by `F.linear` inside a forward (CLIP's fused `in_proj_weight`): swap in
    W + delta before the owner's forward and put the original Parameter back after it (even on error)."""
    original = getattr(owner, param)

    def before(module: nn.Module, args: tuple) -> None:
        setattr(module, param, nn.Parameter(_changed(original, entries), requires_grad=False))

    def after(module: nn.Module, args: tuple, output: object) -> None:
        setattr(module, param, original)

    return [owner.register_forward_pre_hook(before), owner.register_forward_hook(after, always_call=True)]


def _unhook(model: StableDiffusion) -> None:
    for handle in model.loras.handles:
        handle.remove()
    model.loras.handles.clear()


def _hook(model: StableDiffusion) -> None:
    """(Re)install one set of hooks per changed parameter for the adapters' current scales."""
    _unhook(model)
    for (component, module, param), entries in _groups(model).items():
        owner = _module(model, LoraTarget(component, module, param))
        if param == "weight" and isinstance(owner, (nn.Linear, nn.Conv2d)):
            model.loras.handles.append(owner.register_forward_hook(_output_hook(entries)))
        else:
            model.loras.handles.extend(_swap_hooks(owner, param, entries))


def _fuse(model: StableDiffusion) -> None:
    """Write W + delta into new Parameters, keeping the originals (the first time each is changed)."""
    _unhook(model)
    for (component, module, param), entries in _groups(model).items():
        owner = _module(model, LoraTarget(component, module, param))
        original = model.loras.originals.setdefault((component, module, param), getattr(owner, param))
        setattr(owner, param, nn.Parameter(_changed(original, entries), requires_grad=original.requires_grad))
    model.loras.fused = True


def _restore(model: StableDiffusion) -> None:
    """Put every original Parameter back (bit-identical weights) and forget them."""
    for (component, module, param), original in model.loras.originals.items():
        setattr(_module(model, LoraTarget(component, module, param)), param, original)
    model.loras.originals.clear()
    model.loras.fused = False


def _reapply(model: StableDiffusion) -> None:
    """Bring the weights / hooks in line with the adapters and their scales, fused or not: a fused
    model is refused from its originals (never from an already-changed weight, so nothing drifts)."""
    if model.loras.fused:
        _restore(model)
        if model.loras.adapters:
            _fuse(model)
    else:
        _hook(model)


# ---------------------------------------------------------------------------------- the public calls
def load_lora(model: StableDiffusion, path: str | Path, scale: float = 1.0, name: str | None = None, *,
              allow_pickle: bool = False) -> str:  # fmt: skip
    """Load a LoRA / LyCORIS file onto `model` with scale `scale`; returns its name (default: the
    file's stem). Raises `LoraError` for a file of another family, unknown layers or a non-LoRA file."""
    name = Path(path).stem if name is None else name
    if name in model.loras.adapters:
        raise ValueError(f"a LoRA named {name!r} is already loaded; pass another name= or unload it first")
    _check_scale(scale)
    tensors, metadata = read_lora_file(path, allow_pickle=allow_pickle)
    layers = parse_lora(tensors, metadata, model, str(path))
    layers = tuple(_placed(model, layer) for layer in layers)
    model.loras.adapters[name] = Adapter(name, str(path), layers, float(scale))
    _reapply(model)
    logger.info("minisd: LoRA %s: %d layers from %s, scale %g", name, len(layers), path, scale)
    return name


def _placed(model: StableDiffusion, layer: LoraLayer) -> LoraLayer:
    """The layer with its parts (and alpha) on the target weight's device, in its dtype."""
    weight = getattr(_module(model, layer.target), layer.target.param)
    parts = {k: v.to(device=weight.device, dtype=weight.dtype) for k, v in layer.parts.items()}
    return LoraLayer(layer.name, layer.target, layer.method, parts, layer.scale)


def _check_scale(scale: object) -> None:
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"scale: expected a finite number, got {scale!r}")


def set_lora_scale(model: StableDiffusion, name: str, scale: float) -> None:
    """Change the scale of a loaded adapter (fused ones are re-fused from the original weights)."""
    _check_scale(scale)
    _adapter(model, name).scale = float(scale)
    _reapply(model)


def unload_lora(model: StableDiffusion, name: str | None = None) -> None:
    """Remove one adapter (or all): the weights are bit-identical to before it was loaded."""
    names = list(model.loras.adapters) if name is None else [_adapter(model, name).name]
    for n in names:
        del model.loras.adapters[n]
    _reapply(model)


def fuse_lora(model: StableDiffusion) -> None:
    """Write the loaded adapters into the weights (no hooks, no cost per forward); `unfuse_lora` undoes it."""
    if not model.loras.fused:
        _fuse(model)


def unfuse_lora(model: StableDiffusion) -> None:
    """Put the original weights back, bit for bit, and apply the adapters through hooks again."""
    if model.loras.fused:
        _restore(model)
        _hook(model)


def _adapter(model: StableDiffusion, name: str) -> Adapter:
    if name not in model.loras.adapters:
        raise ValueError(f"no LoRA named {name!r} is loaded; loaded: {sorted(model.loras.adapters) or 'none'}")
    return model.loras.adapters[name]
