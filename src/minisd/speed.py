"""Speed options that leave the checkpoint layout alone: fused projections, channels_last, torch.compile.

Each is opt-in and undoable where it changes parameters, so the official key tables, the LoRA
tables and saving keep working on the plain model (docs/performance.md has the measurements).

- `fuse_projections(module)`: every U-Net self-attention's `to_q`, `to_k`, `to_v` become one
  `to_qkv` Linear whose weight is the rows [W_q; W_k; W_v] (one GEMM, one read of the input);
  every cross-attention's `to_k`, `to_v` become one `to_kv` (the context is read once); the VAE's
  mid-block attention's 1x1 convs `q`, `k`, `v` become one `qkv`. This is diffusers'
  `fuse_qkv_projections`, except that the separate layers are removed, not kept beside the fused
  one (no second copy of the weights). `unfuse_projections` splits the rows again: the state
  dict is then bit-identical to the original, keys and order included. The text towers need
  nothing: minisd keeps CLIP's q/k/v fused as `in_proj_weight` already (open_clip's layout).
- `channels_last(module)`: NHWC convolution weights, so every conv (and GroupNorm) runs on the
  NHWC kernels; the U-Net's SpatialTransformer then turns feature maps into tokens by a view.
- `compile_module(module)`: `torch.compile` of the module's computation in place (its class,
  names and state dict unchanged), with `fullgraph=True`: a graph break is an error, not a slow
  path. Input checks that read tensor values (the text tower's token ids) stay outside the graph.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch
from torch import nn

from minisd.clip import TextTransformer
from minisd.unet import CrossAttention
from minisd.vae import AttnBlock, AutoencoderKL

if TYPE_CHECKING:
    from minisd.model import StableDiffusion

logger = logging.getLogger(__name__)

# What each fusion replaces: (attention kind, the official layers, the fused layer).
_SELF = (("to_q", "to_k", "to_v"), "to_qkv", "qkv")
_CROSS = (("to_k", "to_v"), "to_kv", "kv")
_VAE = (("q", "k", "v"), "qkv", True)


# ---------------------------------------------------------------------------------- fused projections
def _layer_like(layer: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
    """A Linear / 1x1 Conv2d of `layer`'s kind holding `weight` and `bias` as its parameters (built on
    meta, so nothing is initialised; `requires_grad` as in `layer`)."""
    if isinstance(layer, nn.Linear):
        new = nn.Linear(layer.in_features, weight.shape[0], bias=bias is not None, device="meta")
    else:
        new = nn.Conv2d(layer.in_channels, weight.shape[0], kernel_size=1, bias=bias is not None, device="meta")
    new.weight = nn.Parameter(weight, requires_grad=layer.weight.requires_grad)
    if bias is not None:
        new.bias = nn.Parameter(bias, requires_grad=layer.bias.requires_grad)
    return new


def _stacked(layers: list[nn.Module]) -> nn.Module:
    """One layer whose output rows are those of `layers` in order: weights and biases concatenated
    along dim 0 (a copy of the bits)."""
    biases = [layer.bias.detach() for layer in layers if layer.bias is not None]
    bias = torch.cat(biases) if biases else None
    return _layer_like(layers[0], torch.cat([layer.weight.detach() for layer in layers]), bias)


def _unstacked(fused: nn.Module, n: int) -> list[nn.Module]:
    """The inverse of `_stacked` for n equal parts: each part's rows cloned into a layer of its own
    (own storage, so it saves and frees like a loaded one)."""
    weights = fused.weight.detach().chunk(n)
    biases = fused.bias.detach().chunk(n) if fused.bias is not None else [None] * n
    return [_layer_like(fused, w.clone(), None if b is None else b.clone()) for w, b in zip(weights, biases)]


def _swap_children(owner: nn.Module, old: tuple[str, ...], new: Mapping[str, nn.Module]) -> None:
    """Replace the children `old` of `owner` by `new`, placed where the first of `old` was, so the
    state dict keeps its order (a fuse then unfuse gives back the same key order)."""
    children: dict[str, nn.Module | None] = {}
    for name, child in owner._modules.items():
        if name == old[0]:
            children.update(new)
        elif name not in old:
            children[name] = child
    owner._modules = children  # nn.Module keeps its children in this dict, in registration order


def _fusions(module: nn.Module) -> list[tuple[nn.Module, tuple[tuple[str, ...], str, object]]]:
    """(attention, what to fuse) for every attention in `module` (itself included)."""
    found = []
    for m in module.modules():
        if isinstance(m, CrossAttention):
            found.append((m, _SELF if m.is_self_attention else _CROSS))
        elif isinstance(m, AttnBlock):
            found.append((m, _VAE))
    return found


def fuse_projections(module: nn.Module) -> nn.Module:
    """Fuse the attention projections of every U-Net / VAE attention in `module` (see the module
    docstring); already fused ones are left alone. Returns `module`. Exact: each output element is
    the same dot product as before, up to the GEMM's accumulation order (~1e-7 relative in fp32)."""
    for attn, (names, fused_name, flag) in _fusions(module):
        if not attn.fused:
            _swap_children(attn, names, {fused_name: _stacked([getattr(attn, n) for n in names])})
            attn.fused = flag
    return module


def unfuse_projections(module: nn.Module) -> nn.Module:
    """Undo `fuse_projections`: the official layers again, bit-identical, in the original key order."""
    for attn, (names, fused_name, _) in _fusions(module):
        if attn.fused:
            parts = _unstacked(getattr(attn, fused_name), len(names))
            _swap_children(attn, (fused_name,), dict(zip(names, parts)))
            attn.fused = None if isinstance(attn, CrossAttention) else False
    return module


def projections_fused(module: nn.Module) -> bool:
    """Whether any attention in `module` has fused projections."""
    return any(attn.fused for attn, _ in _fusions(module))


# ---------------------------------------------------------------------------------- layouts
def channels_last(module: nn.Module) -> nn.Module:
    """`module` with its 4-D weights (the convolutions) in the channels_last (NHWC) layout, in place.

    A convolution whose weight is NHWC returns an NHWC output whatever its input's layout, so the
    whole network then runs on the NHWC kernels (oneDNN on the CPU, cuDNN's tensor-core path on the
    GPU) without touching the inputs. Values are unchanged up to the kernels' summation order."""
    return module.to(memory_format=torch.channels_last)


# ---------------------------------------------------------------------------------- torch.compile
def compile_module(
    module: nn.Module,
    *,
    mode: str | None = None,
    fullgraph: bool = True,
    dynamic: bool | None = None,
    backend: str | object = "inductor",
) -> nn.Module:
    """`torch.compile` the computation of a minisd component in place and return it.

    The U-Net (or any plain module) compiles its whole forward (`nn.Module.compile`); the VAE its
    decode path (`post_quant_conv` and the decoder); a text tower its blocks after the input checks
    (`TextTransformer._encode`). The module keeps its class, names and state dict. `dynamic=None`
    is torch's automatic dynamic shapes: the first size compiles a static graph and a second size
    one graph with symbolic sizes, which every later size reuses (no recompile per size).
    `mode="reduce-overhead"` adds CUDA graphs on a GPU (one recorded graph per input shape)."""
    options = dict(mode=mode, fullgraph=fullgraph, dynamic=dynamic, backend=backend)
    if isinstance(module, TextTransformer):
        module._encode = torch.compile(module._encode, **options)
    elif isinstance(module, AutoencoderKL):
        module._decode = torch.compile(module._decode, **options)
    else:
        module.compile(**options)
    return module


def compile_model(
    sd: StableDiffusion, *, mode: str | None = None, fullgraph: bool = True, dynamic: bool | None = None
) -> StableDiffusion:
    """`compile_module` on the U-Net, the VAE (its decode path) and every text encoder; returns `sd`.
    Compilation itself happens at the first call of each (minutes for a full model with inductor)."""
    for module in (sd.unet, sd.vae, *sd.text_encoders):
        compile_module(module, mode=mode, fullgraph=fullgraph, dynamic=dynamic)
    logger.info("minisd: U-Net, VAE decoder and %d text encoder(s) set to compile", len(sd.text_encoders))
    return sd


# ---------------------------------------------------------------------------------- on a whole model
def fuse_model(sd: StableDiffusion) -> None:
    """`fuse_projections` on the U-Net and the VAE of `sd` (the text towers are fused already)."""
    if sd.loras.adapters:
        raise ValueError(
            f"fuse_projections: LoRAs are loaded ({', '.join(sorted(sd.loras.adapters))}) on the separate "
            "to_q / to_k / to_v layers that fusing replaces; call sd.unload_lora() first, or keep them unfused"
        )
    fuse_projections(sd.unet)
    fuse_projections(sd.vae)


def unfuse_model(sd: StableDiffusion) -> None:
    """`unfuse_projections` on the U-Net and the VAE of `sd`."""
    unfuse_projections(sd.unet)
    unfuse_projections(sd.vae)


def check_unfused(sd: StableDiffusion, what: str) -> None:
    """A ValueError naming `what` if `sd` has fused projections (LoRA targets the official layers)."""
    if projections_fused(sd.unet) or projections_fused(sd.vae):
        raise ValueError(
            f"{what}: the attention projections are fused (sd.fuse_projections()), and LoRA layers target the "
            "separate to_q / to_k / to_v; call sd.unfuse_projections() first (it is exact), then load the LoRA"
        )
