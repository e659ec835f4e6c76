"""A folder of images with same-named `.txt` captions: the layout fine-tuning users already have.

    my-images/
        0001.png   0001.txt      <- "a photo of sks dog on the beach"
        0002.jpg   0002.txt
        sub/0003.webp  sub/0003.txt

This is the layout of kohya's sd-scripts ("caption extension .txt") and of diffusers' ImageFolder
with captions beside the images. Each image is resized so that it covers the training size (the
shorter side matches) and cropped to it, at random (`random_crop=True`) or in the centre. As the
SDXL paper trains (Podell et al. 2023, sec. 2.2), each item records the image's original size
(h, w) and the crop's top-left corner (top, left) in the resized image, for SDXL's size and crop
conditioning (diffusers' train_text_to_image_sdxl.py computes the same two numbers).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import PIL.Image
import PIL.ImageOps
import torch
from torch.utils.data import Dataset

from .trainkit import derived_generator

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


class ImageCaptionFolder(Dataset):
    """Items {"image": (3, h, w) float in [0, 1], "caption": str, "original_size": (h, w) int64,
    "crop_coords_top_left": (top, left) int64} from the images under `root` (recursively).

    Args:
        root: the folder. Every image needs a caption file with the same stem and `.txt`.
        size: the training size, an int (square) or (height, width).
        random_crop: a random crop (drawn from (seed, epoch, index), so runs repeat), else the centre.
        seed: the crops' seed; `set_epoch(e)` (called by the training loop each epoch) gives each
            epoch new crops, as `DistributedSampler.set_epoch` gives new orders.
    """

    def __init__(self, root: str | Path, size: int | tuple[int, int], *, random_crop: bool = True,
                 seed: int = 0) -> None:  # fmt: skip
        self.root = Path(root)
        if not self.root.is_dir():
            raise ValueError(f"root: expected a folder of images with .txt captions, got {str(self.root)!r}")
        self.size = (size, size) if isinstance(size, int) else tuple(size)
        if len(self.size) != 2 or min(self.size) < 1:
            raise ValueError(f"size: expected a positive int or (height, width), got {size!r}")
        self.random_crop, self.seed, self.epoch = random_crop, seed, 0
        self.files = sorted(p for p in self.root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if not self.files:
            raise ValueError(f"root: expected images ({', '.join(IMAGE_SUFFIXES)}) in {self.root}, got none")
        missing = [str(p.relative_to(self.root)) for p in self.files if not p.with_suffix(".txt").exists()]
        if missing:
            more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
            raise ValueError(f"captions: expected a .txt beside every image, missing for {missing[:5]}{more}")

    def __len__(self) -> int:
        return len(self.files)

    def set_epoch(self, epoch: int) -> None:
        """Set the epoch, which seeds the random crops (called by the training loop each epoch)."""
        self.epoch = epoch

    def __getitem__(self, index: int) -> dict:
        path = self.files[index]
        # EXIF orientation applied first: the picture as viewers show it (and its size as they show it).
        image = PIL.ImageOps.exif_transpose(PIL.Image.open(path)).convert("RGB")
        original = (image.height, image.width)
        image, (top, left) = self._resize_and_crop(image, index)
        array = np.asarray(image, dtype=np.float32) / 255.0
        return {
            "image": torch.from_numpy(array).permute(2, 0, 1).contiguous(),  # h w c -> c h w
            "caption": path.with_suffix(".txt").read_text(encoding="utf-8").strip(),
            "original_size": torch.tensor(original),
            "crop_coords_top_left": torch.tensor((top, left)),
        }

    def _resize_and_crop(self, image: PIL.Image.Image, index: int) -> tuple[PIL.Image.Image, tuple[int, int]]:
        """Resize to cover `size` (bicubic), then crop; returns the crop and its (top, left)."""
        th, tw = self.size
        scale = max(th / image.height, tw / image.width)
        h, w = max(th, round(image.height * scale)), max(tw, round(image.width * scale))
        image = image.resize((w, h), PIL.Image.Resampling.BICUBIC)
        if self.random_crop:
            g = derived_generator(self.seed, "crop", self.epoch, index)
            top = int(torch.randint(0, h - th + 1, (), generator=g))
            left = int(torch.randint(0, w - tw + 1, (), generator=g))
        else:
            top, left = round((h - th) / 2), round((w - tw) / 2)
        return image.crop((left, top, left + tw, top + th)), (top, left)
