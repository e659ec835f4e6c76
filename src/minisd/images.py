"""Pixels in and out of the pipelines: PIL images, image tensors and inpainting masks.

The conventions are diffusers' `VaeImageProcessor` (and so A1111's and ComfyUI's):

- an image tensor is `(B, 3, H, W)` float in [0, 1], finite; the VAE sees `2 x - 1`, in [-1, 1];
- an 8-bit PIL image becomes `np.array(image.convert("RGB")) / 255` in float32 (`pil_to_numpy`);
- back to 8 bits: `round(255 * clamp(x / 2 + 0.5, 0, 1))` (`denormalize`, `numpy_to_pil`);
- a mask is read as one gray channel (PIL's `convert("L")`), scaled to [0, 1] and
  binarized at 0.5: white (>= 0.5) is repainted, black is kept
  (`VaeImageProcessor(do_binarize=True, do_convert_grayscale=True)`).

PIL images wider than 8 bits are read by their real range, never through `convert`, which clips
every sample to 0-255 (a 50% gray 16-bit image would read white, a float mask of 1.0 as black):
the rules per mode are in `pil_to_array` and docs/pipelines.md.

Unlike diffusers, nothing is resized here: an image whose size does not fit is an
error for the caller to fix, never a silent resample.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import PIL.Image
import torch

from .pipeline import shown

ImageInput = PIL.Image.Image | torch.Tensor | Sequence[PIL.Image.Image | torch.Tensor]

# PIL modes of one gray band wider than 8 bits, by the sample value that is white (PIL opens 16-bit
# PNGs and TIFFs as I;16*, or I in older Pillow); `_WIDE_FIX`: what to do with values outside [0, white].
WIDE_MODES = {
    **dict.fromkeys(("I;16", "I;16L", "I;16B", "I;16N", "I"), 65535.0),
    "F": 1.0,  # float images are taken as [0, 1], as image tensors are
}
_WIDE_FIX = {
    "I": "mode 'I' is read as 16-bit; scale it to 0-65535 (or pass 8-bit 'L')",
    "F": "scale it to [0, 1] (PIL's convert('F') of an 8-bit image keeps 0-255: divide by 255)",
}


def _items(images: ImageInput, name: str) -> list[PIL.Image.Image | torch.Tensor]:
    items = list(images) if isinstance(images, (list, tuple)) else [images]
    if not items:
        raise ValueError(f"{name}: expected an image or a non-empty list of images, got an empty list")
    return items


def _check_range(t: torch.Tensor, name: str) -> None:
    """Tensor values finite and in [0, 1]."""
    bad = int((~torch.isfinite(t)).sum())
    if bad:
        raise ValueError(f"{name}: tensor values must be finite, in [0, 1], got {bad} NaN or infinite "
                         f"of {t.numel()}; check where the image came from")  # fmt: skip
    if t.numel() and (float(t.min()) < 0.0 or float(t.max()) > 1.0):
        got = f"[{float(t.min()):.3g}, {float(t.max()):.3g}]"
        raise ValueError(f"{name}: tensor values must lie in [0, 1], got {got}; map [-1, 1] images by x / 2 + 0.5")


def _same_size(tensors: list[torch.Tensor], name: str) -> torch.Tensor:
    sizes = sorted({f"{t.shape[-2]}x{t.shape[-1]}" for t in tensors})
    if len(sizes) > 1:
        raise ValueError(f"{name}: all images must have the same size, got {shown(sizes)}; resize them first")
    return torch.cat(tensors)


def _not_an_image(item: object, name: str) -> ValueError:
    return ValueError(f"{name}: expected a PIL image, a torch tensor or a list of them, got {shown(item)}; "
                      "convert arrays with PIL.Image.fromarray or torch.from_numpy")  # fmt: skip


def pil_to_array(image: PIL.Image.Image, name: str, *, gray: bool = False) -> np.ndarray:
    """A PIL image as float32 in [0, 1]: `(H, W, 3)` RGB, or `(H, W)` gray (`gray=True`, for masks).

    - 8-bit modes (1, L, LA, P, PA, RGB, RGBA, RGBa, RGBX, CMYK, YCbCr, LAB, HSV): PIL's exact
      `convert("RGB")`, / 255 (diffusers' `pil_to_numpy`). Alpha is dropped, not composited; a
      premultiplied La image is un-premultiplied as PIL does RGBa. Gray is the luma of that RGB
      (`convert("L")`, ITU-R 601-2), which is exact for L.
    - 16-bit modes (I;16, I;16L, I;16B, I;16N) and I (32-bit integers, read as 16-bit): / 65535.
    - F (32-bit float): taken as [0, 1].
    A wide-mode value outside its range (I or I;16 outside 0-65535, F outside [0, 1], NaN) is an error.
    """
    if image.mode in WIDE_MODES:  # one gray band: scaled by the mode's white, replicated to RGB
        white = WIDE_MODES[image.mode]
        array = np.asarray(image, dtype=np.float64) / white  # float64: every int32 exactly
        if array.size and not (np.isfinite(array).all() and array.min() >= 0.0 and array.max() <= 1.0):
            got = f"[{array.min() * white:.6g}, {array.max() * white:.6g}]"
            fix = _WIDE_FIX.get(image.mode, "check the file")
            raise ValueError(f"{name}: a PIL {image.mode!r} image must hold values in [0, {white:g}], got {got}; {fix}")
        array = array.astype(np.float32)
        return array if gray else np.repeat(array[..., None], 3, axis=-1)
    if image.mode == "La":  # PIL converts premultiplied alpha only as RGBa
        lum, alpha = image.split()
        image = PIL.Image.merge("RGBa", (lum, lum, lum, alpha))
    try:
        rgb = image.convert("RGB")
    except ValueError as e:  # a mode this Pillow cannot convert
        raise ValueError(f"{name}: PIL cannot convert a {image.mode!r} image to RGB ({e}); convert it first") from e
    return np.asarray(rgb.convert("L") if gray else rgb).astype(np.float32) / 255.0


def images_to_tensor(images: ImageInput, name: str = "init_image") -> torch.Tensor:
    """PIL image(s), or tensors `(3, H, W)` / `(B, 3, H, W)` in [0, 1] -> `(N, 3, H, W)` fp32 in [0, 1].

    PIL images of any mode are read by `pil_to_array` (8-bit modes as `convert("RGB")`, 16-bit and
    float ones by their range)."""
    tensors = []
    for item in _items(images, name):
        if isinstance(item, PIL.Image.Image):
            array = pil_to_array(item, name)  # (H, W, 3) -> (1, 3, H, W)
            tensors.append(torch.from_numpy(array).permute(2, 0, 1)[None])
        elif isinstance(item, torch.Tensor):
            t = item[None] if item.dim() == 3 else item
            if t.dim() != 4 or t.shape[1] != 3:
                raise ValueError(f"{name}: expected a (3, H, W) or (B, 3, H, W) tensor, got shape {tuple(item.shape)}")
            _check_range(t, name)
            tensors.append(t.detach().float().cpu())
        else:
            raise _not_an_image(item, name)
    return _same_size(tensors, name)


def masks_to_tensor(masks: ImageInput, name: str = "mask_image") -> torch.Tensor:
    """PIL mask(s), or tensors `(H, W)` / `(B, H, W)` / `(B, 1, H, W)` in [0, 1] -> `(N, 1, H, W)`
    fp32 of 0 (keep) and 1 (repaint), binarized at 0.5 as diffusers' mask processor does: at half
    of the PIL mode's white (128 of 255, 32768 of 65535, 0.5 of F's 1.0; `pil_to_array`)."""
    tensors = []
    for item in _items(masks, name):
        if isinstance(item, PIL.Image.Image):
            array = pil_to_array(item, name, gray=True)  # one gray channel in [0, 1]
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
            raise _not_an_image(item, name)
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
