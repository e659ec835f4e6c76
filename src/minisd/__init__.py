"""minisd: Stable Diffusion v1, v2 and SDXL, written by hand in PyTorch.

See README.md for the tour; each component lives in one file:
`tokenizer`, `clip`, `conditioning`, `unet`, `vae`, `samplers`, `checkpoint`,
`pipeline`, with the shared `attention` function and the `keymap` tables.
"""

__version__ = "0.1.0"
