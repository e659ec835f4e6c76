"""Speed options that leave the checkpoint layout alone: fused projections, channels_last, prepacked
convolutions, sub-pixel upsampling, torch.compile.

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
- `pack_convolutions(module)`: on the CPU, every conv's weight also kept in oneDNN's blocked
  layout, packed once instead of at every call (`PackedConv2d`); its outputs are NHWC.
- `subpixel_upsampling(module)`: every `Upsample` (nearest x2, then a 3x3 conv) computed as one 2x2
  conv of its input and an interleave (`upsample_conv`): the same function, 2.25x fewer FLOPs.
- `compile_module(module)`: `torch.compile` of the module's computation in place (its class,
  names and state dict unchanged), with `fullgraph=True`: a graph break is an error, not a slow
  path. Input checks that read tensor values (the text tower's token ids) stay outside the graph.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from minisd.clip import TextTransformer
from minisd.unet import CrossAttention, memory_format_of
from minisd.unet import Upsample as UNetUpsample
from minisd.vae import AttnBlock, AutoencoderKL
from minisd.vae import Upsample as VAEUpsample

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


# ---------------------------------------------------------------------------------- prepacked convolutions
class PackedConv2d(nn.Conv2d):
    """An `nn.Conv2d` that also keeps its weight in oneDNN's blocked layout, for CPU inference.

    PyTorch's CPU convolution hands oneDNN the OIHW weight, and oneDNN reorders it into its blocked
    layout (OIhw8i8o and the like) on every call. For a U-Net's deep layers (big weights, small
    feature maps) that reorder costs as much as the convolution itself: SD1.5's 1280-channel 3x3 conv
    on a 2x1280x8x8 input took 68 ms plain and 25 ms prepacked on the 2-core test machine. Packing
    once is what inductor's freezing pass does for compiled CPU models (torch/_inductor/fx_passes/
    mkldnn_fusion.py, `mkldnn._convolution_pointwise` on a `mkldnn._reorder_convolution_weight`);
    here it is done eagerly. The output is channels_last (NHWC), so the network after it runs on the
    NHWC kernels, as with `channels_last`.

    The Parameter is left as it was (state dict, LoRA, saving unchanged). The packed copy is made at
    the first call and made again whenever the weight changes (a new tensor, or an in-place update:
    its version counter), and the plain convolution runs whenever packing does not apply: autograd,
    another device, a dtype oneDNN does not pack (fp16), a padding mode other than zeros."""

    _packed: torch.Tensor | None = None
    _packed_for: tuple | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if (x.device.type != "cpu" or x.dtype != w.dtype or w.dtype not in (torch.float32, torch.bfloat16)
                or self.padding_mode != "zeros" or isinstance(self.padding, str)
                or (torch.is_grad_enabled() and (w.requires_grad or x.requires_grad))):  # fmt: skip
            return super().forward(x)
        key = _version_key(self)
        if self._packed_for != key:  # the weight's blocked copy, made once per weight
            self._packed = torch.ops.mkldnn._reorder_convolution_weight(
                w.contiguous(memory_format=torch.channels_last), list(self.padding), list(self.stride),
                list(self.dilation), self.groups, list(x.shape))  # fmt: skip
            self._packed_for = key
        return torch.ops.mkldnn._convolution_pointwise(
            x, self._packed, self.bias, list(self.padding), list(self.stride), list(self.dilation), self.groups,
            "none", [], "")  # fmt: skip


def pack_convolutions(module: nn.Module) -> nn.Module:
    """Every plain `nn.Conv2d` in `module` becomes a `PackedConv2d` (in place; its weights, names and
    state dict unchanged); returns `module`. A no-op where oneDNN (mkldnn) is not available."""
    if not torch.backends.mkldnn.is_available():
        logger.info("minisd: oneDNN is not available in this torch build; convolutions left as they are")
        return module
    for m in module.modules():
        if type(m) is nn.Conv2d:
            m.__class__ = PackedConv2d
    return module


def unpack_convolutions(module: nn.Module) -> nn.Module:
    """Undo `pack_convolutions`: plain `nn.Conv2d`s again, the packed copies dropped; returns `module`."""
    for m in module.modules():
        if type(m) is PackedConv2d:
            m.__dict__.pop("_packed", None), m.__dict__.pop("_packed_for", None)
            m.__class__ = nn.Conv2d
    return module


# ---------------------------------------------------------------------------------- sub-pixel upsampling
def _fold(w: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A 3-tap filter [w0, w1, w2] along `dim`, applied after nearest x2 upsampling, seen from the input:
    even outputs 2i read x[i-1], x[i], x[i] (taps [w0, w1 + w2] on x[i-1], x[i]); odd outputs 2i+1 read
    x[i], x[i], x[i+1] (taps [w0 + w1, w2] on x[i], x[i+1])."""
    a, b, c = w.unbind(dim)
    return torch.stack([a, b + c], dim), torch.stack([a + b, c], dim)


def phase_weights(weight: torch.Tensor) -> torch.Tensor:
    """The (O, I, 3, 3) kernel of a conv that follows a nearest x2 upsampling, as the four (O, I, 2, 2)
    kernels that compute its output's four phases (row parity a, column parity b) from the input
    itself, stacked as (4 O, I, 2, 2) in the order (a, b) = 00, 01, 10, 11 (`_fold` per axis)."""
    return torch.cat([phase for rows in _fold(weight, 2) for phase in _fold(rows, 3)])


def upsample_conv(x: torch.Tensor, phases: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """conv3x3(nearest_x2(x)) computed as one 2x2 convolution of `x` and an interleave. `phases` is that
    convolution (4 O outputs, padding 1, weight `phase_weights(conv.weight)`, the conv's bias 4 times).

    The 2x2 conv over x padded by 1 gives (H+1) x (W+1) positions; phase (a, b) of output pixel
    (2i+a, 2j+b) is its window at (i+a, j+b). 4 taps per phase instead of 9 on an image 4x larger:
    16 O I H W multiply-adds instead of 36 O I H W, 2.25x fewer, exactly the same function (the folded
    taps are pre-added, so fp32 rounding moves by an ulp or so)."""
    n, _, h, w = x.shape
    z = phases(x)
    y = z.unflatten(1, (2, 2, -1))  # (N, a, b, O, H+1, W+1)
    layout = memory_format_of(z)
    out = torch.empty((n, y.shape[3], 2 * h, 2 * w), dtype=y.dtype, device=y.device, memory_format=layout)
    for a in (0, 1):
        for b in (0, 1):
            out[:, :, a::2, b::2] = y[:, a, b, :, a : a + h, b : b + w]
    return out


class SubpixelUpsample(nn.Module):
    """A U-Net or VAE `Upsample` (nearest x2, then `conv`) computed by `upsample_conv`.

    Its `conv` stays the official 3x3 layer (state dict, LoRA and saving unchanged). For inference the
    2x2 phase convolution is derived from it once, kept outside the module tree, and derived again
    when the conv's weight or bias changes; it is a `PackedConv2d` when `conv` is one. With autograd
    on, or inside torch.compile, the phase weights are derived in the graph at every call (gradients
    reach `conv` as before; a compiler folds or fuses the derivation). When `conv` carries hooks (an
    unfused LoRA, offloading), the plain forward runs, so that they do."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, C, 2H, 2W), as the plain Upsample."""
        conv = self.conv
        if conv._forward_hooks or conv._forward_pre_hooks:
            return super().forward(x)
        traced = torch.is_grad_enabled() and (conv.weight.requires_grad or x.requires_grad)
        if traced or torch.compiler.is_compiling():
            bias = None if conv.bias is None else conv.bias.repeat(4)
            return upsample_conv(x, lambda x: F.conv2d(x, phase_weights(conv.weight), bias, padding=1))
        return upsample_conv(x, self._phase_conv())

    def _phase_conv(self) -> nn.Conv2d:
        conv, key = self.conv, _version_key(self.conv)
        if self.__dict__.get("_phases_for") != key:
            phases = type(conv)(conv.in_channels, 4 * conv.out_channels, 2, padding=1, bias=conv.bias is not None,
                                device="meta")  # fmt: skip
            phases.weight = nn.Parameter(phase_weights(conv.weight.detach()), requires_grad=False)
            if conv.bias is not None:
                phases.bias = nn.Parameter(conv.bias.detach().repeat(4), requires_grad=False)
            self.__dict__.update(_phases=phases, _phases_for=key)  # outside _modules: not in the state dict
        return self.__dict__["_phases"]


def _version_key(conv: nn.Conv2d) -> tuple:
    """What identifies a conv's current weights: its kind, and their tensors with their in-place version
    counters (inference tensors, made under torch.inference_mode, have none: 0)."""
    tensors = [t for t in (conv.weight, conv.bias) if t is not None]
    return type(conv), *((t.data_ptr(), 0 if t.is_inference() else t._version, t.dtype) for t in tensors)


# The swapped-in classes: each still an instance of its plain Upsample class, with this forward.
_SUBPIXEL = {cls: type("Subpixel" + cls.__qualname__, (SubpixelUpsample, cls), {})
             for cls in (UNetUpsample, VAEUpsample)}  # fmt: skip


def subpixel_upsampling(module: nn.Module) -> nn.Module:
    """Every U-Net / VAE `Upsample` in `module` computes through `upsample_conv` (in place; names and
    state dict unchanged); returns `module`. `plain_upsampling` undoes it."""
    for m in module.modules():
        if type(m) in _SUBPIXEL:
            m.__class__ = _SUBPIXEL[type(m)]
    return module


def plain_upsampling(module: nn.Module) -> nn.Module:
    """Undo `subpixel_upsampling`: the official interpolate-then-conv forward again; returns `module`."""
    plain = {v: k for k, v in _SUBPIXEL.items()}
    for m in module.modules():
        if type(m) in plain:
            m.__class__ = plain[type(m)]
            m.__dict__.pop("_phases", None), m.__dict__.pop("_phases_for", None)
    return module


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
    unpack_convolutions(module)  # the compiler makes its own kernels (inductor's freezing packs the weights)
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
