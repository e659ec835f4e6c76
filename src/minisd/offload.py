"""Running a model larger than the accelerator's memory: offload, and VAE tiling when a decode would not fit.

- `ModelOffload` (`sd.enable_model_offload(device)`, diffusers' `enable_model_cpu_offload`): every
  component lives on the CPU, and moves whole to `device` when it is called, sending the component
  that ran before back. Peak accelerator memory: the largest component (the U-Net) plus activations;
  cost: one host-to-device copy of each component per generation.
- `SequentialOffload` (`sd.enable_sequential_offload(device)`, diffusers' `enable_sequential_cpu_offload`):
  for very small accelerators. Each module's own weights are copied to `device` just before its forward
  and dropped just after, so only one layer's weights are on the device at a time; the CPU copy is the
  master and is never copied back. Cost: the whole model crosses the bus at every U-Net step.
- `decode_bytes` estimates a VAE decode's activation memory from the VAE config and the latent size, so
  `StableDiffusion.decode` can switch to the tiled decode (`vae.decode_tiled`) when the decode would not
  fit in the device's free memory (`torch.cuda.mem_get_info`), or in a budget the caller gives.

Both offloads work through forward pre-hooks (`nn.Module.register_forward_pre_hook`), which also move a
call's tensor arguments to the device, so the pipelines run unchanged on `sd.device` (the execution device).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from .vae import VAEConfig


def _to(x: object, device: torch.device) -> object:
    """Tensors (also inside tuples, lists and dicts) moved to `device`; anything else as it is."""
    if isinstance(x, torch.Tensor):
        return x.to(device) if x.device != device else x
    if isinstance(x, (tuple, list)):
        return type(x)(_to(v, device) for v in x)
    if isinstance(x, dict):
        return {k: _to(v, device) for k, v in x.items()}
    return x


class _Hooks:
    """Forward pre-hooks (and post-hooks) registered by an offload, removable together."""

    def __init__(self) -> None:
        self.handles: list[torch.utils.hooks.RemovableHandle] = []
        self.moves = 0  # host -> device copies made (of a component, or of one module's weights)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()


class ModelOffload(_Hooks):
    """Each component on `device` only while it is the one running (module docstring)."""

    def __init__(self, components: Iterable[nn.Module], device: torch.device, offload: torch.device) -> None:
        super().__init__()
        self.device, self.offload = torch.device(device), torch.device(offload)
        self.active: nn.Module | None = None
        for component in components:
            component.to(self.offload)
            # The component and its direct children: the VAE runs through `decode`/`encode`, which call
            # its `decoder`/`post_quant_conv` (or `encoder`/`quant_conv`), never its own forward.
            for module in (component, *component.children()):
                hook = lambda m, args, kwargs, c=component: self._before(c, args, kwargs)  # noqa: E731
                self.handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))

    def _before(self, component: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if self.active is not component:
            if self.active is not None:
                self.active.to(self.offload)
            component.to(self.device)
            self.active, self.moves = component, self.moves + 1
        return _to(args, self.device), _to(kwargs, self.device)

    def remove(self) -> None:
        """Remove the hooks; every component back on the offload device."""
        super().remove()
        if self.active is not None:
            self.active.to(self.offload)
            self.active = None


class SequentialOffload(_Hooks):
    """Each module's own weights on `device` only during its forward (module docstring)."""

    def __init__(self, components: Iterable[nn.Module], device: torch.device, offload: torch.device) -> None:
        super().__init__()
        self.device, self.offload = torch.device(device), torch.device(offload)
        # id(parameter or buffer) -> (it, its host tensor), while its data is on the device
        self._host: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for component in components:
            component.to(self.offload)
            for module in component.modules():
                own = [*module._parameters.values(), *module._buffers.values()]
                if not any(t is not None for t in own):
                    continue  # a container: its children carry the weights (and hooks)
                self.handles.append(module.register_forward_pre_hook(self._before, with_kwargs=True))
                self.handles.append(module.register_forward_hook(self._after))

    def _tensors(self, module: nn.Module) -> Iterable[torch.Tensor]:
        # Replacing `.data` keeps each Parameter object (optimisers, LoRA wrappers hold them).
        return (t for t in (*module._parameters.values(), *module._buffers.values()) if t is not None)

    def _before(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        for t in self._tensors(module):
            if id(t) not in self._host:
                self._host[id(t)] = (t, t.data)
                # a copy (also when both devices are the CPU, as in the tests); the host tensor stays the master
                t.data = t.data.to(self.device, non_blocking=True, copy=True)
                self.moves += 1
        return _to(args, self.device), _to(kwargs, self.device)

    def _after(self, module: nn.Module, args: tuple, output: object) -> None:
        for t in self._tensors(module):
            if id(t) in self._host:  # back to the host master: no device-to-host copy, the weights did not change
                t.data = self._host.pop(id(t))[1]

    def remove(self) -> None:
        """Remove the hooks; weights left on the device (a forward that raised) back to their host masters."""
        super().remove()
        for t, host in self._host.values():
            t.data = host
        self._host.clear()


# --------------------------------------------------------------------------- VAE decode memory
# Activations a decode holds at once, in units of its largest feature map: a ResNet block keeps its input
# (the residual), the GroupNorm output (in fp32), the SiLU output and the convolution's output. Measured:
# SD's VAE, 64x64 latent, fp32 on an H100: 1,090 MiB above the weights (benchmarks/README.md) for a
# largest map of 256 channels x 512 x 512 x 4 bytes = 256 MiB, i.e. 4.3 maps; 5 leaves a margin.
DECODE_MAPS = 5


def decode_bytes(config: VAEConfig, latent_hw: tuple[int, int], batch: int, dtype: torch.dtype) -> int:
    """An upper estimate of the activation memory of `AutoencoderKL(config).decode` on latents of
    `latent_hw`: `DECODE_MAPS` copies of the largest feature map, plus the mid-block attention's
    (h w) x (h w) score matrix (the math path of SDPA materialises it; the fused kernels do not).

    The decoder runs the levels in reverse (LDM `Decoder`): level i has `ch * ch_mult[i]` channels
    and, after its upsampling (every level but the first), twice the previous side."""
    h, w = latent_hw
    levels = len(config.ch_mult)
    largest = 0
    for i, mult in enumerate(config.ch_mult):
        side = 2 ** (levels - i if i > 0 else levels - 1)  # after this level's upsample
        largest = max(largest, config.ch * mult * h * w * side * side)
    itemsize = torch.empty((), dtype=dtype).element_size()
    attention = (h * w) ** 2  # one head, fp32 scores at the latent resolution
    return batch * (DECODE_MAPS * largest * itemsize + 4 * attention)


def free_memory(device: torch.device) -> int | None:
    """Free bytes on an accelerator (`torch.cuda.mem_get_info`: the driver's word, other processes
    included), or None where there is no such figure (the CPU)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return None


def should_tile(config: VAEConfig, latents: torch.Tensor, dtype: torch.dtype, budget: int) -> bool:
    """Whether a decode of `latents` needs more than `budget` bytes (`decode_bytes`)."""
    return decode_bytes(config, tuple(latents.shape[-2:]), latents.shape[0], dtype) > budget


def tile_size_for(config: VAEConfig, latents: torch.Tensor, dtype: torch.dtype, limit: int) -> int:
    """The largest square tile (latent pixels, a multiple of 8, at least 16) whose decode fits in `limit`."""
    side = max(latents.shape[-2:])
    while side > 16 and decode_bytes(config, (side, side), latents.shape[0], dtype) > limit:
        side = max(16, 8 * math.floor(side * 0.75 / 8))
    return side
