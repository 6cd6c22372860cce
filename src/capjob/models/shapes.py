"""Synthetic shape scenes whose true caption is known: what the trained tiny model learns to see.

A scene is one or two filled shapes (circle, square, triangle, star) in named colours on a
plain named background, drawn with Pillow. Its caption names them left to right:

    "a green triangle on a black background"
    "a red circle and an orange square on a white background"

The same renderer makes the training data (models/train.py) and the shape rows of
``dataset=sample`` (sample_data.py), so what the offline model is asked to caption is drawn
exactly as what it learnt from. Scenes are ``SCENE_SIZE`` pixels square: under capjob's
default resize (longest side 448, never upscaled) they reach the engine unchanged, as a 4 x 4
grid of Qwen2.5-VL's merged 28-pixel patches, each shape inside one cell of that grid.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

SCENE_SIZE = 112
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
    shapes: tuple[Shape, ...]  # left to right

    @property
    def caption(self) -> str:
        named = " and ".join(f"{_article(s.colour)} {s.colour} {s.kind}" for s in self.shapes)
        return f"{named} on a {self.background} background"


# Shapes stand upright (square sides level, triangle and star pointing up): a turned square is a
# diamond, and a tiny model learns four upright silhouettes in a few hundred steps.
UPRIGHT = {"circle": 0.0, "square": math.pi / 4, "triangle": -math.pi / 2, "star": -math.pi / 2}


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def random_scene(rng: np.random.Generator) -> Scene:
    """One or two shapes (even odds); two never share both kind and colour, and sit in the
    left and right halves so that "left to right" is unambiguous."""
    background = str(rng.choice(list(BACKGROUNDS)))
    count = int(rng.integers(1, 3))
    picks: list[tuple[str, str]] = []
    while len(picks) < count:
        pick = (str(rng.choice(SHAPES)), str(rng.choice(list(COLOURS))))
        if pick not in picks:
            picks.append(pick)
    shapes = []
    for i, (kind, colour) in enumerate(picks):
        # Large shapes: each covers several of the 16 image tokens the model sees.
        if count == 1:
            radius = float(rng.uniform(0.26, 0.36) * SCENE_SIZE)
            cx = float(rng.uniform(radius + 3, SCENE_SIZE - radius - 3))
        else:
            half = SCENE_SIZE / 2
            radius = float(rng.uniform(0.17, 0.23) * SCENE_SIZE)
            cx = float(rng.uniform(radius + 2, half - radius + 1) + i * half)
        cy = float(rng.uniform(radius + 3, SCENE_SIZE - radius - 3))
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


def render(scene: Scene) -> Image.Image:
    """The scene as an RGB image of SCENE_SIZE x SCENE_SIZE pixels."""
    im = Image.new("RGB", (SCENE_SIZE, SCENE_SIZE), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(im)
    for s in scene.shapes:
        fill = COLOURS[s.colour]
        if s.kind == "circle":
            draw.ellipse([s.cx - s.radius, s.cy - s.radius, s.cx + s.radius, s.cy + s.radius], fill=fill)
        else:
            draw.polygon(_polygon(s), fill=fill)
    return im


def token_labels(scene: Scene, cell: int = 28) -> tuple[list[int], list[int]]:
    """What each image token shows, for training: Qwen2.5-VL hands the language model one token
    per `cell` x `cell` pixels (row-major). Per token, the shape covering at least a quarter of
    it (index into SHAPES, +1; 0 for none) and its colour (index into COLOURS, or
    len(COLOURS) + index into BACKGROUNDS where no shape covers it)."""
    mask = Image.new("L", (SCENE_SIZE, SCENE_SIZE), 0)
    draw = ImageDraw.Draw(mask)
    for i, s in enumerate(scene.shapes, 1):
        if s.kind == "circle":
            draw.ellipse([s.cx - s.radius, s.cy - s.radius, s.cx + s.radius, s.cy + s.radius], fill=i)
        else:
            draw.polygon(_polygon(s), fill=i)
    cells = np.asarray(mask).reshape(SCENE_SIZE // cell, cell, SCENE_SIZE // cell, cell).transpose(0, 2, 1, 3)
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
