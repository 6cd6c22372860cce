"""Synthetic shape scenes whose true caption is known: what the trained tiny model learns to see.

A scene is one or two filled shapes (circle, square, triangle, star) in named colours on a
plain named background, drawn with Pillow. Its caption names them in a fixed order of kinds
(circle, square, triangle, star), not of places:

    "a green triangle on a black background"
    "a red circle and an orange square on a white background"

The same renderer makes the training data (models/train.py) and the shape rows of
``dataset=sample`` (stages/sources/sample.py), so what the offline model is asked to caption is drawn
exactly as what it learnt from. Each shape has a ``SCENE_SIZE``-pixel square cell of its own,
side by side (112 x 112 or 224 x 112 px), with the shape large and near the cell's centre.
Under capjob's default resize (longest side 448, never upscaled) a scene reaches the engine
unchanged, as a 4 x 4 or 8 x 4 grid of Qwen2.5-VL's merged 28-pixel patches; the vision
tower's 112-pixel attention windows then hold one shape each. Measured (docs/benchmarks.md,
"Tiny trained model"): what made a model this small learn two-shape scenes was naming them by
kind; one cell per shape keeps every shape as large as a single one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

SCENE_SIZE = 112
RADIUS = 0.30  # circumradius, share of SCENE_SIZE
JITTER = 2.0  # pixels, uniform, on each shape's radius and centre
SHAPES = ("circle", "square", "triangle", "star")
# Saturated colours far apart in RGB, none of them a background colour.
COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (40, 70, 220),
    "yellow": (240, 210, 20),
    "purple": (140, 40, 170),
    "orange": (245, 130, 20),
}
BACKGROUNDS = {"white": (255, 255, 255), "black": (0, 0, 0), "gray": (128, 128, 128)}


@dataclass(frozen=True)
class Shape:
    kind: str
    colour: str
    cx: float  # centre, pixels
    cy: float
    radius: float  # circumradius, pixels
    angle: float  # radians; where the first corner points (squares, triangles, stars)


@dataclass(frozen=True)
class Scene:
    background: str
    shapes: tuple[Shape, ...]  # left to right, one SCENE_SIZE cell each

    @property
    def width(self) -> int:
        """Pixels: one SCENE_SIZE-square cell per shape, side by side."""
        return SCENE_SIZE * len(self.shapes)

    @property
    def caption(self) -> str:
        """The shapes in caption_order, whatever their places, then the background."""
        named = " and ".join(f"{_article(s.colour)} {s.colour} {s.kind}" for s in sorted(self.shapes, key=caption_order))
        return f"{named} on a {self.background} background"


def caption_order(shape: Shape) -> tuple[int, int]:
    """Captions name shapes in the order of SHAPES, two of one kind in the order of COLOURS: a
    model this small learns that content-based order in a few hundred steps, and left to right
    hardly at all (its M-RoPE gives image columns almost no angle; docs/benchmarks.md)."""
    return SHAPES.index(shape.kind), list(COLOURS).index(shape.colour)


# Shapes stand upright (square sides level, triangle and star pointing up): a turned square is a
# diamond, and a tiny model learns four upright silhouettes in a few hundred steps.
UPRIGHT = {"circle": 0.0, "square": math.pi / 4, "triangle": -math.pi / 2, "star": -math.pi / 2}


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def random_scene(rng: np.random.Generator) -> Scene:
    """One or two shapes (even odds); two never share both kind and colour. Each shape sits
    near the centre of its own SCENE_SIZE-pixel cell (a few pixels of jitter in place and size),
    so every shape is drawn as large as a single one."""
    background = str(rng.choice(list(BACKGROUNDS)))
    count = int(rng.integers(1, 3))
    picks: list[tuple[str, str]] = []
    while len(picks) < count:
        pick = (str(rng.choice(SHAPES)), str(rng.choice(list(COLOURS))))
        if pick not in picks:
            picks.append(pick)
    shapes = []
    for i, (kind, colour) in enumerate(picks):
        jitter = rng.uniform(-JITTER, JITTER, size=3)
        radius = float(RADIUS * SCENE_SIZE + jitter[0])
        cx = float((i + 0.5) * SCENE_SIZE + jitter[1])
        cy = float(0.5 * SCENE_SIZE + jitter[2])
        shapes.append(Shape(kind, colour, cx, cy, radius, UPRIGHT[kind]))
    return Scene(background, tuple(shapes))


def _polygon(shape: Shape) -> list[tuple[float, float]]:
    if shape.kind == "square":
        corners = [shape.angle + k * math.pi / 2 for k in range(4)]
        return [(shape.cx + shape.radius * math.cos(a), shape.cy + shape.radius * math.sin(a)) for a in corners]
    if shape.kind == "triangle":
        corners = [shape.angle + k * 2 * math.pi / 3 for k in range(3)]
        return [(shape.cx + shape.radius * math.cos(a), shape.cy + shape.radius * math.sin(a)) for a in corners]
    # Five-pointed star: outer and inner vertices alternate (inner radius 0.45 of the outer).
    points = []
    for k in range(10):
        r = shape.radius if k % 2 == 0 else shape.radius * 0.45
        a = shape.angle + k * math.pi / 5
        points.append((shape.cx + r * math.cos(a), shape.cy + r * math.sin(a)))
    return points


def _draw(draw: ImageDraw.ImageDraw, shape: Shape, fill: object) -> None:
    """One filled shape: the same pixels in the image (render) and in its token mask (token_labels)."""
    if shape.kind == "circle":
        draw.ellipse([shape.cx - shape.radius, shape.cy - shape.radius, shape.cx + shape.radius, shape.cy + shape.radius],
                     fill=fill)
    else:
        draw.polygon(_polygon(shape), fill=fill)


def render(scene: Scene) -> Image.Image:
    """The scene as an RGB image of scene.width x SCENE_SIZE pixels."""
    im = Image.new("RGB", (scene.width, SCENE_SIZE), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(im)
    for s in scene.shapes:
        _draw(draw, s, COLOURS[s.colour])
    return im


def token_labels(scene: Scene, cell: int = 28) -> tuple[list[int], list[int]]:
    """What each image token shows, for training: Qwen2.5-VL hands the language model one token
    per `cell` x `cell` pixels (row-major). Per token, the shape covering at least a quarter of
    it (index into SHAPES, +1; 0 for none) and its colour (index into COLOURS, or
    len(COLOURS) + index into BACKGROUNDS where no shape covers it)."""
    mask = Image.new("L", (scene.width, SCENE_SIZE), 0)
    draw = ImageDraw.Draw(mask)
    for i, s in enumerate(scene.shapes, 1):
        _draw(draw, s, i)
    cells = np.asarray(mask).reshape(SCENE_SIZE // cell, cell, scene.width // cell, cell).transpose(0, 2, 1, 3)
    kinds, colours = [], []
    background = len(COLOURS) + list(BACKGROUNDS).index(scene.background)
    for counts in (np.bincount(c.ravel(), minlength=len(scene.shapes) + 1) for c in cells.reshape(-1, cell * cell)):
        top = int(np.argmax(counts[1:])) + 1 if len(counts) > 1 else 0
        if top and counts[top] * 4 >= cell * cell:
            shape = scene.shapes[top - 1]
            kinds.append(SHAPES.index(shape.kind) + 1)
            colours.append(list(COLOURS).index(shape.colour))
        else:
            kinds.append(0)
            colours.append(background)
    return kinds, colours


def scenes(count: int, seed: int) -> list[Scene]:
    rng = np.random.default_rng(seed)
    return [random_scene(rng) for _ in range(count)]
