"""The built-in shapes dataset (`minisd.shapes`): the grammar of issue 10, the held-out pairs,
determinism, the geometry of each form, and the analytic judge on clean and blurred renders."""

from __future__ import annotations

import random
import re

import numpy as np
import PIL.ImageFilter
import pytest
import torch

from minisd import shapes as S

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: one thread (conftest.py)

# The three forms of issue 10, word for word.
FORMS_RE = {
    "plain": re.compile(r"^a (\w+) (\w+) on a (\w+) background$"),
    "large": re.compile(r"^a large (\w+) (\w+) on a (\w+) background$"),
    "small": re.compile(r"^a small (\w+) (\w+) in the (top left|top right|bottom left|bottom right|center) "
                        r"on a (\w+) background$"),
}  # fmt: skip


def test_palette_is_the_issue_table():
    assert S.COLORS == {
        "red": (230, 25, 25), "green": (30, 170, 50), "blue": (30, 60, 220), "yellow": (240, 220, 30),
        "orange": (245, 140, 20), "purple": (140, 50, 200), "white": (245, 245, 245), "black": (15, 15, 15),
    }  # fmt: skip
    assert S.SHAPES == ("circle", "square", "triangle", "star")
    assert S.HELD_OUT == {("purple", "star"), ("yellow", "triangle"), ("blue", "circle"), ("orange", "square"),
                          ("white", "star"), ("green", "triangle")}  # fmt: skip
    assert len(S.pairs()) == 26 and len(S.pairs(held_out=True)) == 6


def test_captions_follow_the_grammar_and_never_name_a_held_out_pair():
    data = S.ShapesDataset(3000, seed=5)
    forms = set()
    for i in range(len(data)):
        scene = data.scene(i)
        text = scene.caption
        match = next((f, m) for f, r in FORMS_RE.items() if (m := r.match(text)))
        form, m = match
        forms.add(form)
        color, shape, bg = m.group(1), m.group(2), m.groups()[-1]
        assert (color, shape, bg) == (scene.color, scene.shape, scene.bg)
        assert color in S.COLORS and bg in S.COLORS and shape in S.SHAPES and color != bg
        assert (color, shape) not in S.HELD_OUT, text
        for held_color, held_shape in S.HELD_OUT:
            assert f"{held_color} {held_shape}" not in text
    assert forms == {"plain", "large", "small"}


def test_items_are_a_pure_function_of_seed_and_index():
    a, b, c = S.ShapesDataset(50, seed=1), S.ShapesDataset(50, seed=1), S.ShapesDataset(50, seed=2)
    for i in (0, 7, 49):
        assert a[i]["caption"] == b[i]["caption"]
        assert torch.equal(a[i]["image"], b[i]["image"])
    assert [a[i]["caption"] for i in range(20)] != [c[i]["caption"] for i in range(20)]
    item = a[3]
    assert item["image"].shape == (3, 32, 32) and item["image"].dtype == torch.float32
    assert 0.0 <= float(item["image"].min()) and float(item["image"].max()) <= 1.0
    with pytest.raises(IndexError):
        a[50]


def _foreground(scene: S.Scene, size: int = 128) -> np.ndarray:
    """Pixels of a render that are nearer the foreground colour than the background."""
    a = np.asarray(S.render(scene, size), dtype=np.float32)
    fg, bg = (np.asarray(S.COLORS[c], dtype=np.float32) for c in (scene.color, scene.bg))
    return np.linalg.norm(a - fg, axis=-1) < np.linalg.norm(a - bg, axis=-1)


@pytest.mark.parametrize("form", S.FORMS)
def test_geometry_of_each_form(form):
    rng = random.Random(0)
    lo, hi = {"large": (0.50, 0.60), "small": (0.25, 0.35), "plain": S.WIDTHS["plain"]}[form]
    for shape in S.SHAPES:
        for _ in range(5):
            scene = S.make_scene(rng, "red", shape, form)
            mask = _foreground(scene)
            cols, rows = np.nonzero(mask.any(axis=0))[0], np.nonzero(mask.any(axis=1))[0]
            width = (cols[-1] - cols[0] + 1) / 128
            assert lo - 0.02 <= width <= hi + 0.02, (shape, form, width)
            cx, cy = (cols[0] + cols[-1] + 1) / 256, (rows[0] + rows[-1] + 1) / 256
            nx, ny = S.POSITIONS[scene.position]
            assert abs(cx - nx) < 0.04 and abs(cy - ny) < 0.04, (shape, form, cx, cy)
            if form == "small" and scene.position != "center":  # the centre lies in the named quadrant
                assert (cx < 0.5) == ("left" in scene.position) and (cy < 0.5) == ("top" in scene.position)


def test_shapes_fill_their_box_as_expected():
    """Circle ~pi/4 of its box, square 1, triangle 1/2, star ~0.38 (with low solidity)."""
    expected = {"circle": np.pi / 4, "square": 1.0, "triangle": 0.5, "star": 0.384}
    for shape, fill in expected.items():
        mask = _foreground(S.Scene("white", shape, "black", "large", "center", 0.6, 0.5, 0.5), 256)
        cols, rows = np.nonzero(mask.any(axis=0))[0], np.nonzero(mask.any(axis=1))[0]
        box = (cols[-1] - cols[0] + 1) * (rows[-1] - rows[0] + 1)
        assert mask.sum() / box == pytest.approx(fill, abs=0.03), shape
        assert S.MOMENTS[shape][0] == pytest.approx(fill, abs=0.01)


def _all_scenes(rng: random.Random) -> list[S.Scene]:
    """Every pair (training and held-out) in every form, small ones in every position."""
    scenes = []
    for held in (False, True):
        for color, shape in S.pairs(held):
            scenes.append(S.make_scene(rng, color, shape, "plain"))
            scenes.append(S.make_scene(rng, color, shape, "large"))
            for position in S.POSITIONS:
                scenes.append(S.make_scene(rng, color, shape, "small", position))
    return scenes


@pytest.mark.parametrize("blur", [0.0, 0.6])
def test_judge_reads_back_every_attribute(blur):
    """~100% on clean renders of every attribute, and still right under a decoder-like blur."""
    scenes = _all_scenes(random.Random(1))[:: 2 if blur else 1]
    wrong = []
    for scene in scenes:
        image = S.render(scene)
        if blur:
            image = image.filter(PIL.ImageFilter.GaussianBlur(blur))
        right = S.score(scene, S.judge(image))
        wrong += [(scene.caption, k) for k, ok in right.items() if not ok]
    assert len(wrong) <= len(scenes) // 100, wrong


def test_judge_reads_each_background_and_foreground_colour():
    for fg in S.COLORS:
        for bg in S.COLORS:
            if fg != bg:
                j = S.judge(S.render(S.Scene(fg, "square", bg, "plain", "center", 0.42, 0.5, 0.5)))
                assert (j.fg, j.bg, j.shape) == (fg, bg, "square")


def test_judge_sees_nothing_on_a_blank_picture():
    j = S.judge(S.render(S.Scene("red", "circle", "blue", "plain", "center", 0.0, 0.5, 0.5)))
    assert (j.bg, j.fg, j.shape) == ("blue", None, None)
    assert S.score(S.Scene("red", "circle", "blue", "plain", "center", 0.4, 0.5, 0.5), j) == {
        "bg": True, "fg": False, "shape": False, "all": False}  # fmt: skip


def test_score_asks_size_and_position_only_where_the_caption_does():
    rng = random.Random(2)
    plain, large, small = (S.make_scene(rng, "red", "circle", f) for f in S.FORMS)
    assert set(S.score(plain, S.judge(S.render(plain)))) == {"bg", "fg", "shape", "all"}
    assert set(S.score(large, S.judge(S.render(large)))) == {"bg", "fg", "shape", "size", "all"}
    assert set(S.score(small, S.judge(S.render(small)))) == {"bg", "fg", "shape", "size", "position", "all"}
    # A large render judged against a small caption gets the size wrong.
    assert S.score(small, S.judge(S.render(large)))["size"] is False


def test_eval_scenes_are_fixed_and_cover_the_attributes():
    a, b = S.eval_scenes(10), S.eval_scenes(10)
    assert a == b and len(a) == 30
    assert all(not s.held_out for s in a) and all(s.held_out for s in S.eval_scenes(6, held_out=True))
    small = [s for s in a if s.form == "small"]
    assert {s.position for s in small} == set(S.POSITIONS)
    assert {s.shape for s in a} == set(S.SHAPES)


def test_report_counts_only_asked_attributes():
    rep = S.Report.of([{"bg": True, "fg": False, "shape": True, "all": False},
                       {"bg": True, "fg": True, "shape": True, "size": True, "all": True}])  # fmt: skip
    assert rep.accuracy == {"bg": 1.0, "fg": 0.5, "shape": 1.0, "size": 1.0, "all": 0.5}
    assert rep.counts["size"] == 1 and rep.n == 2


def test_bad_inputs_raise():
    rng = random.Random(0)
    with pytest.raises(ValueError, match="form"):
        S.caption("red", "circle", "blue", form="huge")
    with pytest.raises(ValueError, match="both red"):
        S.make_scene(rng, "red", "circle", "plain", bg="red")
    with pytest.raises(ValueError, match="shape"):
        S.shape_polygon("hexagon", 0, 0, 1)
