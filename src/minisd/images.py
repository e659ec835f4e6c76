"""Pixels in and out of the pipelines: PIL images, image tensors and inpainting masks.

The conventions are diffusers' `VaeImageProcessor` (and so A1111's and ComfyUI's):

- an image tensor is `(B, 3, H, W)` float in [0, 1]; the VAE sees `2 x - 1`, in [-1, 1];
- a PIL image becomes `np.array(image) / 255` in float32 (`pil_to_numpy`);
- back to 8 bits: `round(255 * clamp(x / 2 + 0.5, 0, 1))` (`denormalize`, `numpy_to_pil`);
- a mask is read as one gray channel (PIL's `convert("L")`), scaled to [0, 1] and
  binarized at 0.5: white (>= 0.5) is repainted, black is kept
  (`VaeImageProcessor(do_binarize=True, do_convert_grayscale=True)`).

Unlike diffusers, nothing is resized here: an image whose size does not fit is an
error for the caller to fix, never a silent resample.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import PIL.Image
import torch

ImageInput = PIL.Image.Image | torch.Tensor | Sequence[PIL.Image.Image | torch.Tensor]


def _items(images: ImageInput, name: str) -> list[PIL.Image.Image | torch.Tensor]:
    items = list(images) if isinstance(images, (list, tuple)) else [images]
    if not items:
        raise ValueError(f"{name}: expected an image or a non-empty list of images, got an empty list")
    return items


def _check_range(t: torch.Tensor, name: str) -> None:
    if t.numel() and (float(t.min()) < 0.0 or float(t.max()) > 1.0):
        got = f"[{float(t.min()):.3g}, {float(t.max()):.3g}]"
        raise ValueError(f"{name}: tensor values must lie in [0, 1], got {got}")


def _same_size(tensors: list[torch.Tensor], name: str) -> torch.Tensor:
    sizes = sorted({f"{t.shape[-2]}x{t.shape[-1]}" for t in tensors})
    if len(sizes) > 1:
        raise ValueError(f"{name}: all images must have the same size, got {', '.join(sizes)}")
    return torch.cat(tensors)


def images_to_tensor(images: ImageInput, name: str = "init_image") -> torch.Tensor:
    """PIL image(s), or tensors `(3, H, W)` / `(B, 3, H, W)` in [0, 1] -> `(N, 3, H, W)` fp32 in [0, 1].

    PIL images are converted to RGB first (an RGBA or grayscale image is accepted)."""
    tensors = []
    for item in _items(images, name):
        if isinstance(item, PIL.Image.Image):
            # diffusers' pil_to_numpy: uint8 -> float32 / 255, (H, W, 3) -> (1, 3, H, W)
            array = np.asarray(item.convert("RGB")).astype(np.float32) / 255.0
            tensors.append(torch.from_numpy(array).permute(2, 0, 1)[None])
        elif isinstance(item, torch.Tensor):
            t = item[None] if item.dim() == 3 else item
            if t.dim() != 4 or t.shape[1] != 3:
                raise ValueError(f"{name}: expected a (3, H, W) or (B, 3, H, W) tensor, got shape {tuple(item.shape)}")
            _check_range(t, name)
            tensors.append(t.detach().float().cpu())
        else:
            raise ValueError(f"{name}: expected a PIL image, a tensor or a list of them, got {type(item).__name__}")
    return _same_size(tensors, name)


def masks_to_tensor(masks: ImageInput, name: str = "mask_image") -> torch.Tensor:
    """PIL mask(s), or tensors `(H, W)` / `(B, H, W)` / `(B, 1, H, W)` in [0, 1] -> `(N, 1, H, W)`
    fp32 of 0 (keep) and 1 (repaint), binarized at 0.5 as diffusers' mask processor does."""
    tensors = []
    for item in _items(masks, name):
        if isinstance(item, PIL.Image.Image):
            array = np.asarray(item.convert("L")).astype(np.float32) / 255.0  # one gray channel
            tensors.append(torch.from_numpy(array)[None, None])
        elif isinstance(item, torch.Tensor):
            # (H, W) is one mask; (B, H, W) gets its channel axis (diffusers' do_convert_grayscale)
            t = item
            if t.dim() == 2:
                t = t[None, None]
            elif t.dim() == 3:
                t = t[:, None]
            if t.dim() != 4 or t.shape[1] != 1:
                expected = "a (H, W), (B, H, W) or (B, 1, H, W) tensor"
                raise ValueError(f"{name}: expected {expected}, got shape {tuple(item.shape)}")
            _check_range(t, name)
            tensors.append(t.detach().float().cpu())
        else:
            raise ValueError(f"{name}: expected a PIL image, a tensor or a list of them, got {type(item).__name__}")
    mask = _same_size(tensors, name)
    # VaeImageProcessor.binarize: values < 0.5 -> 0, values >= 0.5 -> 1
    return (mask >= 0.5).to(torch.float32)


def to_unit_range(decoded: torch.Tensor) -> torch.Tensor:
    """VAE output (nominally [-1, 1]) -> fp32 in [0, 1], clamped (diffusers' `denormalize`)."""
    return (decoded.float() * 0.5 + 0.5).clamp(0, 1)


def tensor_to_pil(images: torch.Tensor) -> list[PIL.Image.Image]:
    """`(B, 3, H, W)` in [0, 1] -> RGB PIL images, rounding to the nearest of 256 levels
    (diffusers' `numpy_to_pil`: `(x * 255).round().astype("uint8")`)."""
    array = images.detach().cpu().permute(0, 2, 3, 1).float().numpy()  # b c h w -> b h w c
    array = (array * 255).round().astype(np.uint8)
    return [PIL.Image.fromarray(a) for a in array]
