"""The built-in synthetic dataset: flat-coloured shapes on flat backgrounds, and its judge.

Issue 10 asks for a dataset that a from-scratch Stable Diffusion can learn on a CPU in under
an hour, and whose pictures can be *measured* instead of eyeballed. Every picture is one
filled, flat-coloured shape (circle, square, triangle pointing up, five-pointed star pointing
up) on a flat background, drawn with Pillow from a seed, captioned by a small grammar:

    a {color} {shape} on a {bg} background                          (plain: centred, 40-46% wide)
    a large {color} {shape} on a {bg} background                    (centred, 50-60% wide)
    a small {color} {shape} in the {position} on a {bg} background  (25-35% wide, centre in the region)

Item `i` of `ShapesDataset(seed=s)` is a pure function of `(s, i)`. Six colour-shape pairs
(`HELD_OUT`) never appear in training pictures or captions, so generating them measures
composition. `judge` reads a picture back analytically (background, foreground colour, shape,
size, position); `evaluate` runs a model over grammar prompts and scores it. See
docs/tiny-model.md for how the shipped model was trained on this data and how it scores.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import PIL.Image
import PIL.ImageDraw
import PIL.ImageFilter
import torch

if TYPE_CHECKING:  # annotations only: the dataset and the judge need no model code
    from .model import StableDiffusion
    from .vae import AutoencoderKL

logger = logging.getLogger(__name__)

# ------------------------------------------------------------------------------ vocabulary
# The sRGB values of issue 10, word for word.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (230, 25, 25),
    "green": (30, 170, 50),
    "blue": (30, 60, 220),
    "yellow": (240, 220, 30),
    "orange": (245, 140, 20),
    "purple": (140, 50, 200),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}
SHAPES = ("circle", "square", "triangle", "star")
# Centre of the shape as a fraction of (width, height): issue 10 puts the corners at ~28% / 72%.
POSITIONS: dict[str, tuple[float, float]] = {
    "top left": (0.28, 0.28),
    "top right": (0.72, 0.28),
    "bottom left": (0.28, 0.72),
    "bottom right": (0.72, 0.72),
    "center": (0.5, 0.5),
}
# Never in training pictures or captions (issue 10), so that they measure composition.
HELD_OUT: frozenset[tuple[str, str]] = frozenset(
    {
        ("purple", "star"),
        ("yellow", "triangle"),
        ("blue", "circle"),
        ("orange", "square"),
        ("white", "star"),
        ("green", "triangle"),
    }
)
FORMS = ("plain", "large", "small")
SIZE = 32  # pixels per side of the pictures (and of the tiny model trained on them, minisd.TINY)
# Shape width as a fraction of the image width, per form. "large" and "small" are issue 10's;
# the plain form is our choice: medium and centred, between the two, so it never looks "small".
WIDTHS: dict[str, tuple[float, float]] = {"plain": (0.40, 0.46), "large": (0.50, 0.60), "small": (0.25, 0.35)}
# How often each form is drawn for training: small gets the most, since it alone teaches the
# five positions (and it is the hardest form to draw at 32 pixels).
FORM_WEIGHTS = (0.3, 0.3, 0.4)
JITTER = 0.03  # the centre moves up to 3% of the side around its nominal place
SUPERSAMPLE = 4  # draw at 4x and box-filter down: anti-aliased edges, which a small VAE reconstructs better
# The star's inner radius / outer radius: 0.382 is the regular pentagram ({5/2}); ours is a
# little fatter so that its arms survive a x4 autoencoder at 32 pixels, and still fills only
# ~0.38 of its bounding box (a circle fills pi/4, a square 1, a triangle 1/2).
STAR_INNER = 0.45


def caption(color: str, shape: str, bg: str, form: str = "plain", position: str = "center") -> str:
    """The grammar's caption for a scene (the three forms of issue 10, word for word)."""
    if form == "plain":
        return f"a {color} {shape} on a {bg} background"
    if form == "large":
        return f"a large {color} {shape} on a {bg} background"
    if form == "small":
        return f"a small {color} {shape} in the {position} on a {bg} background"
    raise ValueError(f"form must be one of {FORMS}, got {form!r}")


@dataclass(frozen=True)
class Scene:
    """One picture: what is drawn, where (fractions of the side), and its caption."""

    color: str
    shape: str
    bg: str
    form: str  # "plain", "large" or "small"
    position: str  # a key of POSITIONS ("center" for plain and large)
    width: float  # the shape's bounding-box width / the image width
    cx: float  # centre of the shape's bounding box, x / width
    cy: float  # ... y / height

    @property
    def caption(self) -> str:
        """The scene described in words."""
        return caption(self.color, self.shape, self.bg, self.form, self.position)

    @property
    def held_out(self) -> bool:
        """Whether the color/shape pair is one held out of training."""
        return (self.color, self.shape) in HELD_OUT


def pairs(held_out: bool = False) -> list[tuple[str, str]]:
    """The (colour, shape) pairs of training (`held_out=False`, 26 of them) or the six held out."""
    return [(c, s) for c in COLORS for s in SHAPES if ((c, s) in HELD_OUT) == held_out]


def make_scene(rng: random.Random, color: str, shape: str, form: str, position: str | None = None,
               bg: str | None = None) -> Scene:  # fmt: skip
    """A scene of a given pair and form; the rest (background, size, jitter) drawn from `rng`."""
    bg = bg or rng.choice([c for c in COLORS if c != color])
    if bg == color:
        raise ValueError(f"foreground and background are both {color}")
    if form == "small":
        position = position or rng.choice(list(POSITIONS))
    else:
        position = "center"
    lo, hi = WIDTHS[form]
    x, y = POSITIONS[position]
    return Scene(color, shape, bg, form, position, rng.uniform(lo, hi),
                 x + rng.uniform(-JITTER, JITTER), y + rng.uniform(-JITTER, JITTER))  # fmt: skip


def sample_scene(rng: random.Random, *, held_out: bool = False) -> Scene:
    """A random scene: a training pair (or a held-out one), a form drawn by `FORM_WEIGHTS`."""
    color, shape = rng.choice(pairs(held_out))
    form = rng.choices(FORMS, weights=FORM_WEIGHTS)[0]
    return make_scene(rng, color, shape, form)


# ------------------------------------------------------------------------------ drawing
def shape_polygon(shape: str, cx: float, cy: float, width: float) -> list[tuple[float, float]]:
    """The outline of a square, triangle or star whose bounding box is `width` wide and centred
    at (cx, cy), in pixels. The triangle is equilateral and the star regular, both pointing up."""
    if shape == "square":
        h = width / 2
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "triangle":
        h = width * math.sqrt(3) / 2  # equilateral: height = sqrt(3)/2 of the side
        return [(cx, cy - h / 2), (cx + width / 2, cy + h / 2), (cx - width / 2, cy + h / 2)]
    if shape == "star":
        # Outer radius from the width (the two side arms span 2 R sin 72deg); the box spans
        # R above (top point) to R cos 36deg below (the two feet), so the star's centre sits lower.
        r_out = width / (2 * math.sin(math.radians(72)))
        oy = cy + (r_out - r_out * math.cos(math.radians(36))) / 2
        points = []
        for k in range(10):
            r = r_out if k % 2 == 0 else r_out * STAR_INNER
            a = math.radians(-90 + 36 * k)
            points.append((cx + r * math.cos(a), oy + r * math.sin(a)))
        return points
    raise ValueError(f"shape must be one of {SHAPES}, got {shape!r}")


def _draw(draw: PIL.ImageDraw.ImageDraw, shape: str, cx: float, cy: float, width: float, fill) -> None:
    if shape == "circle":
        r = width / 2
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    else:
        draw.polygon(shape_polygon(shape, cx, cy, width), fill=fill)


def render(scene: Scene, size: int = SIZE) -> PIL.Image.Image:
    """The scene as an RGB picture `size` pixels square, drawn at `SUPERSAMPLE` x and box-filtered down."""
    big = size * SUPERSAMPLE
    image = PIL.Image.new("RGB", (big, big), COLORS[scene.bg])
    _draw(PIL.ImageDraw.Draw(image), scene.shape, scene.cx * big, scene.cy * big, scene.width * big,
          COLORS[scene.color])  # fmt: skip
    return image.resize((size, size), PIL.Image.BOX)


def to_tensor(image: PIL.Image.Image) -> torch.Tensor:
    """An RGB PIL image -> a (3, H, W) float32 tensor in [0, 1]."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


class ShapesDataset(torch.utils.data.Dataset):
    """`length` pictures drawn on the fly; item i is a pure function of (seed, i).

    Items are dicts {"image": (3, size, size) float in [0, 1], "caption": str}, the format of
    `minisd.train`. `held_out=True` draws only the held-out pairs (for evaluation, never training)."""

    def __init__(self, length: int = 100_000, *, seed: int = 0, size: int = SIZE, held_out: bool = False) -> None:
        self.length, self.seed, self.size, self.held_out = length, seed, size, held_out

    def __len__(self) -> int:
        return self.length

    def scene(self, index: int) -> Scene:
        """The scene of item `index`, the same on every run for the same seed (IndexError out of range)."""
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for {self.length} items")
        # A string seed is hashed with SHA-512 by `random.seed`: stable across runs and platforms.
        return sample_scene(random.Random(f"shapes:{self.seed}:{index}"), held_out=self.held_out)

    def __getitem__(self, index: int) -> dict:
        scene = self.scene(index)
        return {"image": to_tensor(render(scene, self.size)), "caption": scene.caption}


def eval_scenes(n_per_form: int, *, seed: int = 1234, held_out: bool = False) -> list[Scene]:
    """Fixed evaluation scenes, `n_per_form` of each form, cycling through the pairs (training or
    held-out) and, for the small form, the five positions, so every attribute value is covered."""
    rng = random.Random(f"eval:{seed}:{held_out}")
    chosen = pairs(held_out)
    scenes = []
    for form in FORMS:
        for i in range(n_per_form):
            color, shape = chosen[(i + FORMS.index(form)) % len(chosen)]
            position = list(POSITIONS)[i % len(POSITIONS)] if form == "small" else None
            scenes.append(make_scene(rng, color, shape, form, position))
    return scenes


# ------------------------------------------------------------------------------ the judge
# Thresholds of `judge`, each with its reason:
BORDER = 0.06  # the outer 6% ring is background: no scene's shape comes closer than ~10% to an edge
MIN_CONTRAST = 40.0  # sRGB distance below which nothing is drawn (the closest palette pair is 84 apart)
LARGE_ABOVE = 0.425  # width fraction between "small" (<= 35%) and "large" (>= 50%), halfway
CENTER_WITHIN = 0.11  # |centre - 0.5| under this on both axes is "center" (the corners sit 0.22 away)
# Template blurs tried, in pixels at 32x32 (scaled with the size): sharp, and as soft as a decoder makes it.
TEMPLATE_BLURS = (0.0, 0.5, 1.0)


@dataclass(frozen=True)
class Judgement:
    """What `judge` read from a picture. `fg`/`shape` are None when no foreground stands out."""

    bg: str
    fg: str | None
    shape: str | None
    width: float  # bounding-box width / image width
    cx: float  # bounding-box centre, x / width
    cy: float
    scores: dict[str, float]  # soft IoU with each shape's template

    @property
    def size(self) -> str:
        """'large' or 'small', by the measured width."""
        return "large" if self.width > LARGE_ABOVE else "small"

    @property
    def position(self) -> str:
        """'center', or the quadrant ('top left', ...) of the measured center."""
        dx, dy = self.cx - 0.5, self.cy - 0.5
        if max(abs(dx), abs(dy)) < CENTER_WITHIN:
            return "center"
        return ("top " if dy < 0 else "bottom ") + ("left" if dx < 0 else "right")


def nearest_color(rgb: np.ndarray) -> str:
    """The palette colour nearest to an sRGB triple (Euclidean in sRGB)."""
    names = list(COLORS)
    dist = [float(np.linalg.norm(rgb - np.asarray(COLORS[n], dtype=np.float32))) for n in names]
    return names[int(np.argmin(dist))]


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected region of a boolean mask (a breadth-first flood fill)."""
    labels = np.zeros(mask.shape, dtype=np.int32)
    best, best_size, label = 0, 0, 0
    h, w = mask.shape
    for start in zip(*np.nonzero(mask)):
        if labels[start]:
            continue
        label += 1
        labels[start] = label
        queue, size = [start], 0
        while queue:
            y, x = queue.pop()
            size += 1
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not labels[ny, nx]:
                    labels[ny, nx] = label
                    queue.append((ny, nx))
        if size > best_size:
            best, best_size = label, size
    return labels == best


def _dilate(mask: np.ndarray) -> np.ndarray:
    out = mask.copy()
    out[1:] |= mask[:-1]
    out[:-1] |= mask[1:]
    out[:, 1:] |= mask[:, :-1]
    out[:, :-1] |= mask[:, 1:]
    return out


def _outline_moments(shape: str) -> tuple[float, float, float]:
    """(area / box area, box height / box width, centroid below the box centre / box width) of a
    shape, exact: the circle's by formula, the polygons' by the shoelace formula."""
    if shape == "circle":
        return math.pi / 4, 1.0, 0.0
    pts = shape_polygon(shape, 0.0, 0.0, 1.0)
    cross = [x0 * y1 - x1 * y0 for (x0, y0), (x1, y1) in zip(pts, pts[1:] + pts[:1])]
    area = sum(cross) / 2
    cy = sum((y0 + y1) * c for ((_, y0), (_, y1)), c in zip(zip(pts, pts[1:] + pts[:1]), cross)) / (6 * area)
    ys = [y for _, y in pts]
    height = max(ys) - min(ys)
    return abs(area) / height, height, cy - (max(ys) + min(ys)) / 2


MOMENTS = {shape: _outline_moments(shape) for shape in SHAPES}


def template(shape: str, size: int, cx: float, cy: float, width: float, blur: float = 0.0) -> np.ndarray:
    """Coverage in [0, 1] of `shape` `width` pixels wide with its box centred at (cx, cy), in a `size`
    square image, anti-aliased like `render`, then Gaussian-blurred by `blur` pixels."""
    scene = Scene("white", shape, "black", "plain", "center", width / size, cx / size, cy / size)
    image = render(scene, size).convert("L")
    if blur:
        image = image.filter(PIL.ImageFilter.GaussianBlur(blur))
    return (np.asarray(image, dtype=np.float32) - COLORS["black"][0]) / (COLORS["white"][0] - COLORS["black"][0])


def _fit(shape: str, coverage: np.ndarray) -> tuple[float, float, float, float]:
    """(soft IoU, width, cx, cy) of the best `shape` template with the area and centroid of `coverage`.

    Area and centroid are unchanged by blur, so a blurred picture gets a box of the right size;
    the template is also tried blurred (`TEMPLATE_BLURS`), as decoded pictures are softer."""
    size = coverage.shape[0]
    fill, aspect, drop = MOMENTS[shape]
    area = float(coverage.sum())
    centers = np.arange(size) + 0.5
    mx = float(coverage.sum(axis=0) @ centers) / area
    my = float(coverage.sum(axis=1) @ centers) / area
    width = math.sqrt(area / (fill * aspect))
    cx, cy = mx, my - drop * width  # the box centre sits above the centroid of a triangle or star
    ious = []
    for blur in TEMPLATE_BLURS:
        t = template(shape, size, cx, cy, width, blur * size / 32)
        ious.append(float(np.minimum(t, coverage).sum() / np.maximum(t, coverage).sum()))
    return max(ious), width, cx, cy


def judge(image: PIL.Image.Image) -> Judgement:
    """Read background, foreground colour, shape, size and position back from a square picture.

    1. Background: the median of the border ring, snapped to the nearest palette colour.
    2. Foreground: pixels at least half as far from the background as the farthest ones (the
       half-coverage line of an anti-aliased edge), largest connected region; its colour is the
       median of its core, snapped to the palette.
    3. Coverage of each pixel near that region, (pixel - bg) projected on (fg - bg): the shape's
       soft mask.
    4. Shape: for each shape, the renderer's own outline with the coverage's area and centroid
       (`_fit`); the best soft IoU wins. Template matching needs no hand-tuned ratios, yet keeps
       their meaning: a circle fills pi/4 of its box, a square 1, a triangle 1/2, our star ~0.38.
       Its box gives the size and the position.
    """
    a = np.asarray(image.convert("RGB"), dtype=np.float32)
    size = a.shape[0]
    b = max(1, round(size * BORDER))
    ring = np.concatenate([a[:b].reshape(-1, 3), a[-b:].reshape(-1, 3), a[:, :b].reshape(-1, 3),
                           a[:, -b:].reshape(-1, 3)])  # fmt: skip
    bg_rgb = np.median(ring, axis=0)
    dist = np.linalg.norm(a - bg_rgb, axis=-1)
    peak = float(np.percentile(dist, 99.5))
    if peak < MIN_CONTRAST:
        return Judgement(nearest_color(bg_rgb), None, None, 0.0, 0.5, 0.5, {})
    region = _largest_component(dist >= 0.5 * peak)
    core = region & (dist >= 0.75 * peak)
    fg_rgb = np.median(a[core if core.any() else region], axis=0)
    axis = fg_rgb - bg_rgb
    near = _dilate(_dilate(_dilate(region)))  # a blurred edge spreads a pixel or two beyond the half line
    coverage = np.clip(((a - bg_rgb) @ axis) / float(axis @ axis), 0.0, 1.0) * near
    fits = {shape: _fit(shape, coverage) for shape in SHAPES}
    best = max(fits, key=lambda s: fits[s][0])
    _, width, cx, cy = fits[best]
    scores = {s: f[0] for s, f in fits.items()}
    return Judgement(nearest_color(bg_rgb), nearest_color(fg_rgb), best, width / size, cx / size, cy / size, scores)


# ------------------------------------------------------------------------------ evaluation
ATTRIBUTES = ("bg", "fg", "shape", "size", "position", "all")


def score(scene: Scene, j: Judgement) -> dict[str, bool]:
    """Which attributes of `scene` the picture got right. Size is asked by the large and small
    forms, position by the small form; "all" is every attribute the caption asked for."""
    right = {"bg": j.bg == scene.bg, "fg": j.fg == scene.color, "shape": j.shape == scene.shape}
    if scene.form in ("large", "small"):
        right["size"] = j.size == scene.form
    if scene.form == "small":
        right["position"] = j.position == scene.position
    right["all"] = all(right.values())
    return right


@dataclass(frozen=True)
class Report:
    """Accuracy per attribute over a set of scenes (each attribute over the scenes that ask it)."""

    n: int
    accuracy: dict[str, float]
    counts: dict[str, int]  # scenes that ask each attribute

    @classmethod
    def of(cls, scored: Sequence[dict[str, bool]]) -> Report:
        """The report of `scored` items: per attribute, the accuracy over the items that asked it."""
        acc, counts = {}, {}
        for attr in ATTRIBUTES:
            asked = [s[attr] for s in scored if attr in s]
            if asked:
                acc[attr], counts[attr] = sum(asked) / len(asked), len(asked)
        return cls(len(scored), acc, counts)

    def row(self) -> str:
        """One line with each attribute's accuracy ('n/a' when not asked)."""
        return " ".join(f"{a} {self.accuracy[a]:6.1%}" if a in self.accuracy else f"{a}    n/a" for a in ATTRIBUTES)


@dataclass(frozen=True)
class Evaluation:
    """`evaluate`'s result: the training pairs and the held-out pairs, scored apart."""

    train: Report
    held_out: Report
    settings: dict

    def table(self) -> str:
        """A markdown table, one row per pair set."""
        head = "| pairs | n | " + " | ".join(ATTRIBUTES) + " |"
        rows = [head, "|" + "---|" * (len(ATTRIBUTES) + 2)]
        for name, rep in (("training", self.train), ("held-out", self.held_out)):
            cells = [f"{rep.accuracy[a]:.0%}" if a in rep.accuracy else "-" for a in ATTRIBUTES]
            rows.append(f"| {name} | {rep.n} | " + " | ".join(cells) + " |")
        return "\n".join(rows)


def generate_scenes(model: StableDiffusion, scenes: Sequence[Scene], *, seed: int = 0, batch: int = 16,
                    **generate_kwargs) -> Iterator[PIL.Image.Image]:  # fmt: skip
    """Pictures of the scenes' captions, batch by batch; batch k uses seed `seed + k`."""
    for k in range(0, len(scenes), batch):
        prompts = [s.caption for s in scenes[k : k + batch]]
        yield from model.generate(prompts, seed=seed + k // batch, **generate_kwargs)


def evaluate(model: StableDiffusion, n_per_form: int = 16, *, seed: int = 0, size: int | None = None,
             steps: int | None = None, guidance_scale: float | None = None,
             sampler: str | None = None) -> Evaluation:  # fmt: skip
    """Generate grammar prompts with a model and judge every picture.

    `n_per_form` prompts of each form for the training pairs, and as many for the held-out pairs
    (`eval_scenes`, fixed). `steps`, `guidance_scale`, `sampler` default to the model's own
    (`StableDiffusion.generate`'s); `size` to the family's default size."""
    kwargs = {"steps": steps, "guidance_scale": guidance_scale, "sampler": sampler}
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    if size is not None:
        kwargs.update(width=size, height=size)
    reports = []
    for held in (False, True):
        scenes = eval_scenes(n_per_form, held_out=held)
        images = generate_scenes(model, scenes, seed=seed, **kwargs)
        reports.append(Report.of([score(s, judge(im)) for s, im in zip(scenes, images)]))
    settings = {"n_per_form": n_per_form, "seed": seed, "size": size, **kwargs}
    logger.info("shapes evaluation %s: training %s; held-out %s", settings, reports[0].row(), reports[1].row())
    return Evaluation(reports[0], reports[1], settings)


def tensor_to_images(images: torch.Tensor) -> list[PIL.Image.Image]:
    """(B, 3, H, W) in [0, 1] -> RGB PIL images (rounded to 8 bits, as a saved PNG would be)."""
    array = (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [PIL.Image.fromarray(a) for a in array]


@torch.no_grad()
def evaluate_reconstructions(vae: AutoencoderKL, n_per_form: int = 16, *, size: int = SIZE) -> tuple[Evaluation, float]:
    """The autoencoder's ceiling: judge VAE reconstructions (posterior means) of the evaluation scenes,
    as `evaluate` judges generated pictures. Returns the evaluation and the PSNR in dB."""
    reports, sq_err, count = [], 0.0, 0
    for held in (False, True):
        scenes = eval_scenes(n_per_form, held_out=held)
        x = torch.stack([to_tensor(render(s, size)) for s in scenes])
        rec = ((vae.decode(vae.encode(2 * x - 1).mean).float() + 1) / 2).clamp(0, 1)
        sq_err, count = sq_err + float((rec - x).pow(2).sum()), count + x.numel()
        reports.append(Report.of([score(s, judge(im)) for s, im in zip(scenes, tensor_to_images(rec))]))
    psnr = -10 * math.log10(sq_err / count)
    return Evaluation(reports[0], reports[1], {"n_per_form": n_per_form, "vae": True}), psnr
