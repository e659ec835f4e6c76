"""minisd: Stable Diffusion v1, v2 and SDXL, written by hand in PyTorch.

See README.md for the tour; each component lives in one file:
`tokenizer`, `clip`, `conditioning`, `unet`, `vae`, `schedules`, `denoisers`, `samplers`,
`checkpoint`, `pipeline`, with the shared `attention` function, the `keymap`
tables and the `families` table.

    import minisd
    sd = minisd.load("v1-5-pruned-emaonly.safetensors")
    image = sd.generate("a photograph of an astronaut riding a horse", seed=0)[0]
"""

from .checkpoint import load, save
from .detection import DetectedModel, detect
from .keymap import CheckpointError
from .pipeline import StableDiffusion

__version__ = "0.1.0"
__all__ = ["CheckpointError", "DetectedModel", "StableDiffusion", "detect", "load", "save"]
