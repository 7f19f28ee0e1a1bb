"""A toy video-language world in which the whole SynViTA method runs on a laptop CPU.

Short clips (32x32 pixels, 8 frames) of coloured shapes that move, captioned by templates, with
negative captions of all seven VideoCon misalignment types, and a toy text-to-video "generator"
that shows the two faults the paper blames on real generators (§4, Fig. 2):

- an appearance gap: synthetic clips look unlike real ones (another palette, texture, noise);
- semantic failures: with a rate that depends on the misalignment type, the clip shows the REAL
  caption instead of the negative one it was asked for (flip and hallucination fail most).

A scene is a small structure, a caption is a template over it, and a negative is an edited scene,
so every caption (negatives included) can be rendered.

    from toyworld import random_scene, negative, caption, parse_caption, render, ToyGenerator
"""
import random
import re
from dataclasses import dataclass, field, replace

import numpy as np

SIZE, FRAMES, OBJ = 32, 8, 7  # frame side, frames per clip, object side (pixels)
COLOURS = {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (50, 80, 230), "yellow": (230, 210, 40)}
SHAPES = ("square", "circle", "triangle")
MOTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
COUNTS = {1: "a", 2: "two", 3: "three"}
TYPES = ("action", "attribute", "object", "count", "relation", "flip", "hallucination")  # VideoCon's seven


@dataclass(frozen=True)
class Thing:
    colour: str
    shape: str
    motion: str = "still"  # a key of MOTIONS, or "still"
    count: int = 1


@dataclass(frozen=True)
class Scene:
    """One or more things. With `relation` ("above"/"below"): things[0] moves left or right above
    or below the still things[1]. Without: the things move one after the other ("A, then B"),
    each in its own turn of the clip and its own lane."""
    things: tuple
    relation: str = ""


# ---- captions, both ways --------------------------------------------------------------------------
def phrase(t):
    """'a red square moves left' / 'two blue circles move up' / 'a green triangle'."""
    noun = f"{COUNTS[t.count]} {t.colour} {t.shape}{'s' if t.count > 1 else ''}"
    if t.motion == "still":
        return noun
    return f"{noun} {'moves' if t.count == 1 else 'move'} {t.motion}"


def caption(scene):
    """The template caption of a scene."""
    if scene.relation:
        return f"{phrase(scene.things[0])} {scene.relation} {phrase(scene.things[1])}"
    return ", then ".join(phrase(t) for t in scene.things)


NUMBERS = {w: n for n, w in COUNTS.items()}
PHRASE = re.compile(rf"^({'|'.join(NUMBERS)}) ({'|'.join(COLOURS)}) ({'|'.join(SHAPES)})s?"
                    rf"(?: moves? ({'|'.join(MOTIONS)}))?$")


def parse_thing(text):
    m = PHRASE.match(text.strip())
    if not m:
        raise ValueError(f"not a toy-world phrase: {text!r}")
    count, colour, shape, motion = m.groups()
    return Thing(colour, shape, motion or "still", NUMBERS[count])


def parse_caption(text):
    """The scene a caption describes (the inverse of `caption`); a ValueError names bad text."""
    m = re.match(r"^(.*) (above|below) (.*)$", text.strip())
    if m:
        return Scene((parse_thing(m.group(1)), parse_thing(m.group(3))), relation=m.group(2))
    return Scene(tuple(parse_thing(p) for p in text.split(", then ")))


# ---- scenes and their seven kinds of negatives ----------------------------------------------------
def random_thing(rng, moving=True, horizontal=False, count=1, avoid=()):
    while True:
        motions = ["left", "right"] if horizontal else list(MOTIONS)
        t = Thing(rng.choice(list(COLOURS)), rng.choice(SHAPES), rng.choice(motions) if moving else "still", count)
        if (t.colour, t.shape) not in avoid:
            return t


def random_scene(rng, kind=None):
    """A random scene of kind "single" (one thing, 1-3 copies, any direction), "relation" or
    "sequence" (two things, moving left or right)."""
    kind = kind or rng.choice(["single", "relation", "sequence"])
    if kind == "single":
        return Scene((random_thing(rng, count=rng.choice([1, 2, 3])),))
    a = random_thing(rng, horizontal=True)  # several things move left/right only: no collisions
    b = random_thing(rng, moving=kind != "relation", horizontal=True, avoid={(a.colour, a.shape)})
    return Scene((a, b), relation=rng.choice(["above", "below"]) if kind == "relation" else "")


def negative_types(scene):
    """The misalignment types that make sense for this scene."""
    if scene.relation:
        return ["action", "attribute", "object", "relation"]
    return ["action", "attribute", "object", "hallucination"] + (["count"] if len(scene.things) == 1 else ["flip"])


def _other(rng, options, current):
    return rng.choice([o for o in options if o != current])


def negative(scene, kind, rng):
    """An edited scene whose caption is a negative of type `kind` for `scene`."""
    a, *rest = scene.things
    if kind == "action":
        motions = ["left", "right"] if len(scene.things) > 1 else list(MOTIONS)
        return replace(scene, things=(replace(a, motion=_other(rng, motions, a.motion)), *rest))
    if kind == "attribute":
        return replace(scene, things=(replace(a, colour=_other(rng, list(COLOURS), a.colour)), *rest))
    if kind == "object":
        return replace(scene, things=(replace(a, shape=_other(rng, SHAPES, a.shape)), *rest))
    if kind == "count" and len(scene.things) == 1:
        return replace(scene, things=(replace(a, count=_other(rng, list(COUNTS), a.count)),))
    if kind == "relation" and scene.relation:
        return replace(scene, relation={"above": "below", "below": "above"}[scene.relation])
    if kind == "flip" and len(scene.things) > 1 and not scene.relation:
        return replace(scene, things=(*rest, a))
    if kind == "hallucination" and not scene.relation:  # an event that never happens
        extra = random_thing(rng, horizontal=True, avoid={(t.colour, t.shape) for t in scene.things})
        return replace(scene, things=(*scene.things, extra))
    raise ValueError(f"no {kind!r} negative for {caption(scene)!r}: use negative_types(scene)")


# ---- rendering -----------------------------------------------------------------------------------
def _mask(shape):
    """A boolean OBJ x OBJ stamp of the shape."""
    y, x = np.mgrid[:OBJ, :OBJ]
    c = (OBJ - 1) / 2
    if shape == "square":
        return np.ones((OBJ, OBJ), bool)
    if shape == "circle":
        return (x - c) ** 2 + (y - c) ** 2 <= (c + 0.5) ** 2
    return np.abs(x - c) <= y / 2 + 0.5  # triangle, apex up


LO, HI = 4, SIZE - OBJ - 4  # the range of an object's top-left corner


def _positions(motion, lane, n):
    """Top-left corners (x, y) of a thing over the n frames of its turn, on `lane` (its y when it
    moves left/right or stays still, its x when it moves up/down); a move travels HI - LO pixels."""
    if motion == "still":
        return [((LO + HI) // 2, lane)] * n
    dx, dy = MOTIONS[motion]
    start, stop = (LO, HI) if dx + dy > 0 else (HI, LO)
    steps = np.linspace(start, stop, n).round().astype(int)
    return [(int(s), lane) if dx else (lane, int(s)) for s in steps]


def render(scene, seed=0, palette=None, texture=0.0, noise=0.0):
    """uint8 frames (FRAMES, SIZE, SIZE, 3) that show `scene`.

    Things without a relation take turns (np.array_split of the frames); before its turn a thing
    waits at its start, after it at its end. palette replaces COLOURS; texture (0..1) darkens
    every other pair of rows of the objects; noise is the std of Gaussian pixel noise. The defaults
    draw a "real" clip."""
    rng = np.random.default_rng(seed)
    colours = palette or COLOURS
    frames = np.empty((FRAMES, SIZE, SIZE, 3), np.float32)
    frames[:] = 25 + rng.integers(0, 15, (1, SIZE, SIZE, 1))  # a faint, still background texture
    n = len(scene.things)
    if scene.relation:  # the mover's lane is above (smaller y) or below the still thing's
        top, bottom = LO, HI
        lanes = [top, bottom] if scene.relation == "above" else [bottom, top]
        turns = [range(FRAMES)] * 2
    else:
        lanes = [(LO + HI) // 2] if n == 1 else np.linspace(LO, HI, n).round().astype(int).tolist()
        turns = [range(t[0], t[-1] + 1) for t in np.array_split(np.arange(FRAMES), n)]
    obj = np.zeros((FRAMES, SIZE, SIZE), bool)
    for t, lane, turn in zip(scene.things, lanes, turns):
        track = _positions(t.motion, lane, len(turn))
        for f in range(FRAMES):
            x, y = track[min(max(f - turn.start, 0), len(turn) - 1)]
            for c in range(t.count):  # copies stand side by side across the direction of motion
                off = (c - (t.count - 1) / 2) * (OBJ + 2)
                across_y = t.motion in ("left", "right", "still")
                cx = int(np.clip(x if across_y else x + off, 0, SIZE - OBJ))
                cy = int(np.clip(y + off if across_y else y, 0, SIZE - OBJ))
                m = _mask(t.shape)
                frames[f, cy: cy + OBJ, cx: cx + OBJ][m] = colours[t.colour]
                obj[f, cy: cy + OBJ, cx: cx + OBJ] |= m
    if texture:  # stripes on the objects only
        stripes = np.where(np.arange(SIZE) % 4 < 2, 1 - texture, 1.0)[None, :, None, None]
        frames = np.where(obj[..., None], frames * stripes, frames)
    if noise:
        frames = frames + rng.normal(0, noise, frames.shape)
    return frames.clip(0, 255).astype(np.uint8)


# ---- the toy text-to-video generator ------------------------------------------------------------
# A generator reads only the caption it is asked to draw. Each of its semantic failures gets one
# aspect of that caption wrong, with a rate per aspect named after the misalignment type that tests
# it: a "flip" failure draws the events in another order, a "hallucination" failure leaves out the
# last event, an "action" failure moves the first thing in another direction, and so on. On a
# negative caption, a failure of its own type often draws the REAL caption instead (always, for
# flip, relation and hallucination). The defaults put the weights' per-type means in the order of
# the paper's Fig. 2: flip and hallucination lowest, attribute and object highest.
FAILURE_RATES = {"action": 0.3, "attribute": 0.1, "object": 0.1, "count": 0.3, "relation": 0.4,
                 "flip": 0.6, "hallucination": 0.6}
SYNTHETIC_PALETTE = {"red": (250, 90, 120), "green": (120, 230, 80), "blue": (90, 60, 200), "yellow": (250, 170, 60)}


def can_fail(scene, kind):
    """Whether a generator can get the aspect named by `kind` wrong when drawing this scene."""
    if kind == "hallucination":  # it can leave out the last of several events
        return len(scene.things) > 1 and not scene.relation
    return kind in negative_types(scene)


def corrupt(scene, rates, rng):
    """The scene a generator with these failure rates actually draws for `scene`, and the list of
    aspects it got wrong."""
    wrong = []
    for kind in TYPES:
        if can_fail(scene, kind) and rng.random() < rates.get(kind, 0.0):
            last_left_out = replace(scene, things=scene.things[:-1])
            scene = last_left_out if kind == "hallucination" else negative(scene, kind, rng)
            wrong.append(kind)
    return scene, wrong


@dataclass
class ToyGenerator:
    """A text-to-video "model" for the toy world: caption in, frames out (FRAMES, SIZE, SIZE, 3).

    failure_rates: per misalignment type, the rate of the semantic failure named after it;
    palette, texture, noise: the appearance gap (False, 0, 0 draw clips that look real)."""
    failure_rates: dict = field(default_factory=lambda: dict(FAILURE_RATES))
    palette: bool = True
    texture: float = 0.5
    noise: float = 12.0

    def __call__(self, prompt, seed=0):
        """V^s = G(t^s, noise): the frames drawn for caption `prompt` with this seed."""
        drawn, _ = corrupt(parse_caption(prompt), self.failure_rates, random.Random(seed))
        return render(drawn, seed=seed, palette=SYNTHETIC_PALETTE if self.palette else None,
                      texture=self.texture, noise=self.noise)
