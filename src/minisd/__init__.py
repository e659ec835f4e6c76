"""minisd: Stable Diffusion v1, v2 and SDXL, written by hand in PyTorch.

One file per component (docs/architecture.md walks them in order):
`tokenizer`, `clip` (text transformers), `conditioning`, `unet`, `vae`, with the shared
`attention`; `schedules`, `denoisers`, `samplers` and the `compat` rules for diffusers seed
parity; `families` (what differs between v1, v2 and SDXL), `keymap` (strict key tables),
`layouts` and `diffusers_format` (the foreign layouts), `detection` and `checkpoint`
(files in and out); `pipeline` (txt2img, img2img, inpainting, the refiner stage, hires fix), `model`
(`StableDiffusion`, `load`, `base_then_refiner`), `images`; what A1111 / ComfyUI users bring:
`prompt_syntax`, `prompt_chunks`, `embeddings`, `lora`, `vae_files`; `parity` (`minisd parity`);
and the shell: `cli`, `metadata`, `batch`.

    import minisd
    sd = minisd.load("v1-5-pruned-emaonly.safetensors")
    image = sd.generate("a photograph of an astronaut riding a horse", seed=0)[0]
"""

from pathlib import Path

from . import train as train  # the training loop (docs/training.md): minisd.train.train(...)
from .checkpoint import save
from .detection import DetectedModel, detect
from .keymap import CheckpointError
from .model import StableDiffusion, base_then_refiner, load
from .pipeline import NonFiniteError

# The tiny SD1-architecture model trained from scratch on `minisd.shapes` (docs/tiny-model.md),
# shipped inside the package: `minisd.load(minisd.TINY)`; `minisd generate` uses it by default.
TINY = Path(__file__).parent / "data" / "tiny-sd.safetensors"

__version__ = "0.1.0"
__all__ = [
    "CheckpointError", "DetectedModel", "NonFiniteError", "StableDiffusion", "TINY", "base_then_refiner", "detect",
    "load", "save",
]  # fmt: skip
