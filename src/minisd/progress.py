"""Watching a run: a progress bar on a terminal, and previews of the image as it forms.

Both are `generate` callbacks (`callback(info)` once per step, `samplers.Callback`), so the library
itself never prints. `combine` runs several callbacks as one.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

import torch

from .images import tensor_to_pil
from .samplers import Callback

# A1111's "Approx cheap" preview (modules/sd_vae_approx.py `cheap_approximation`, from
# https://discuss.huggingface.co/t/decoding-latents-to-rgb-without-upscaling/23204/2): RGB in [-1, 1] as a
# linear map of the 4 scaled latent channels, fitted on decoded images. Rows: latent channel; columns: R, G, B.
LATENT_RGB = {
    "sd": ((0.298, 0.207, 0.208), (0.187, 0.286, 0.173), (-0.158, 0.189, 0.264), (-0.184, -0.271, -0.473)),
    "sdxl": ((0.3448, 0.4168, 0.4395), (-0.1953, -0.0290, 0.0250), (0.1074, 0.0886, -0.0163),
             (-0.3730, -0.2499, -0.2088)),  # fmt: skip
}
SDXL_SCALE_FACTOR = 0.13025  # the SDXL VAE's latent scale (SD1/SD2: 0.18215); it tells the two latent spaces apart


def latents_to_rgb(latents: torch.Tensor, scale_factor: float) -> torch.Tensor:
    """Scaled latents `(B, 4, h, w)` -> a rough picture `(B, 3, h, w)` in [0, 1], with no VAE (one matmul)."""
    coefs = LATENT_RGB["sdxl" if abs(scale_factor - SDXL_SCALE_FACTOR) < 1e-6 else "sd"]
    m = torch.tensor(coefs, dtype=torch.float32, device=latents.device)
    rgb = torch.einsum("blxy,lr->brxy", latents.float(), m)  # b l h w -> b rgb h w
    return ((rgb + 1) / 2).clamp(0, 1)


class ProgressBar:
    """`label [#####.....] 12/20  3.4 it/s  0:02 left`, redrawn in place on `stream` (a terminal).

    `total` is the number of steps expected; a step counter that goes back to 0 (a second pass, as the
    hires fix) starts a new line."""

    def __init__(self, stream: TextIO, label: str, total: int, width: int = 24) -> None:
        self.stream, self.label, self.total, self.width = stream, label, total, width
        self.start = time.monotonic()
        self.last = -1

    def __call__(self, info: dict) -> None:
        i = int(info["i"])
        if i < self.last:  # a new pass
            self.close()
            self.start = time.monotonic()
        self.last = i
        done = i + 1
        total = max(self.total, done)
        rate = done / max(time.monotonic() - self.start, 1e-9)
        left = (total - done) / rate
        bar = "#" * (self.width * done // total)
        eta = f"{int(left) // 60}:{int(left) % 60:02d}"
        line = f"{self.label} [{bar:.<{self.width}}] {done}/{total} {rate:5.2f} it/s {eta} left"
        self.stream.write("\r" + line)
        self.stream.flush()

    def close(self) -> None:
        """End the bar's line, if it drew anything."""
        if self.last >= 0:
            self.stream.write("\n")
            self.stream.flush()


class Preview:
    """Writes the current clean estimate x̂0 (`info["denoised"]`) every `every` steps as `<stem>-step<NNN>.png`
    in `folder`, decoded by `latents_to_rgb` (the first image of the batch), through `write(image, path)`."""

    def __init__(self, folder: Path, stem: str, every: int, scale_factor: float,
                 write: Callable[[object, Path], None]) -> None:  # fmt: skip
        self.folder, self.stem, self.every, self.scale_factor, self.write = folder, stem, every, scale_factor, write
        self.passes, self.last = 0, -1

    def __call__(self, info: dict) -> None:
        i = int(info["i"])
        self.passes += i < self.last
        self.last = i
        if (i + 1) % self.every:
            return
        image = tensor_to_pil(latents_to_rgb(info["denoised"][:1], self.scale_factor))[0]
        stage = f"-pass{self.passes + 1}" if self.passes else ""
        name = f"{self.stem}{stage}-step{i + 1:03d}.png"
        self.write(image, self.folder / name)


def combine(*callbacks: Callback | None) -> Callback | None:
    """One callback that runs each given one in turn (None when none is given)."""
    present = [c for c in callbacks if c is not None]
    if not present:
        return None

    def run(info: dict) -> None:
        for c in present:
            c(info)

    return run
