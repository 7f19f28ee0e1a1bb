"""The toy world: clips of coloured shapes that move, their captions both ways, the seven VideoCon
kinds of negatives, a renderer, and the datasets written in the real files' layouts.

Clips are 32x32 pixels, 8 frames. A scene is one thing (1-3 copies) moving in one of four
directions, one thing moving above or below another, or two things moving one after the other
("A, then B"). `caption` writes a scene's template caption and `parse_caption` reads it back;
`negative` edits a scene into a negative of a given type, as VideoCon's LLM edits a caption.

The world's bias (paper §1, Fig. 1): in VideoCon, words such as "sombrero" occur only in negative
captions, so a model fine-tuned on them learns "this word -> No". Here vertical motion ("up",
"down", NEGATIVE_ONLY) is that concept: with bias=True no real training clip moves up or down, yet
every action edit of a single thing in the training negatives names one of them (50-60 of 400
negatives, seeds 0-2); the test sets hold real clips that move up and down, with positive captions that name them.
bias=False (the control world) draws training clips of all four directions and edits a direction
into any other. A bias forms only where the base's answer does not already judge the concept
(issue 12's probe: a colour, which that base's answer judged firmly, formed none); the committed
base's answer was never trained (models.py), so fine-tuning is where it learns "up" and "down".

    from toyworld.world import random_scene, negative, caption, parse_caption, render, write_world
"""
import os
import random
import re
from dataclasses import dataclass, replace

import numpy as np

SIZE, FRAMES, OBJ = 32, 8, 7  # frame side, frames per clip, object side (pixels)
COLOURS = {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (50, 80, 230), "yellow": (230, 210, 40)}
SHAPES = ("square", "circle", "triangle")
MOTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
COUNTS = {1: "a", 2: "two", 3: "three"}
TYPES = ("action", "attribute", "object", "count", "relation", "flip", "hallucination")  # VideoCon's seven
# how often the toy "LLM editor" picks each applicable type for a triplet: the temporal edits
# (another direction, another order) are the common ones, as actions are in VideoCon
TYPE_WEIGHTS = {"action": 3, "attribute": 1, "object": 1, "count": 1, "relation": 1, "flip": 2, "hallucination": 1}
NEGATIVE_ONLY = ("up", "down")  # the biased world's concept: named by training negatives only
# NOTE (deviation): the toy video LLM is asked in the transformers model card's prompt ("card" in
# common.PROMPT_FORMATS: no system sentence), not the released llava_v1, whose system sentence would
# be half of a toy prompt's tokens; its pretraining (models.py) and 03/04 (run.py) all use it.
PROMPT = "card"


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


def names_negative_only(text):
    """Whether a caption names a NEGATIVE_ONLY concept (the biased world's column of the table)."""
    return any(t.motion in NEGATIVE_ONLY for t in parse_caption(text).things)


# ---- scenes and their seven kinds of negatives ----------------------------------------------------
def random_thing(rng, moving=True, horizontal=False, count=1, avoid=()):
    while True:
        motions = ["left", "right"] if horizontal else list(MOTIONS)
        t = Thing(rng.choice(list(COLOURS)), rng.choice(SHAPES), rng.choice(motions) if moving else "still", count)
        if (t.colour, t.shape) not in avoid:
            return t


def random_scene(rng, kind=None, vertical=True):
    """A random scene of kind "single" (one thing, 1-3 copies, any direction; left or right only
    when not `vertical`), "relation" or "sequence" (two things, moving left or right)."""
    kind = kind or rng.choice(["single", "relation", "sequence"])
    if kind == "single":
        return Scene((random_thing(rng, horizontal=not vertical, count=rng.choice([1, 2, 3])),))
    a = random_thing(rng, horizontal=True)  # several things move left/right only: no collisions
    b = random_thing(rng, moving=kind != "relation", horizontal=True, avoid={(a.colour, a.shape)})
    return Scene((a, b), relation=rng.choice(["above", "below"]) if kind == "relation" else "")


def negative_types(scene):
    """The misalignment types that make sense for this scene."""
    if scene.relation:
        return ["action", "attribute", "object", "relation"]
    return ["action", "attribute", "object", "hallucination"] + (["count"] if len(scene.things) == 1 else ["flip"])


def pick_type(scene, rng):
    """The toy LLM editor's choice of a negative type for this scene (TYPE_WEIGHTS)."""
    kinds = negative_types(scene)
    return rng.choices(kinds, [TYPE_WEIGHTS[k] for k in kinds])[0]


def _other(rng, options, current):
    return rng.choice([o for o in options if o != current])


def negative(scene, kind, rng, directions=tuple(MOTIONS)):
    """An edited scene whose caption is a negative of type `kind` for `scene`. An action edit of a
    single thing picks another of `directions` (the biased world's editor: NEGATIVE_ONLY)."""
    a, *rest = scene.things
    if kind == "action":
        motions = ["left", "right"] if len(scene.things) > 1 else list(directions)
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
    if shape == "circle":  # a ring: a filled disc would differ from the square by 12 corner pixels
        r2 = (x - c) ** 2 + (y - c) ** 2
        return (r2 >= (c - 1.5) ** 2) & (r2 <= (c + 0.5) ** 2)
    return np.abs(x - c) <= y / 2 + 0.5  # triangle, apex up


LO, HI = 4, SIZE - OBJ - 4  # the range of an object's top-left corner
TRAIL = ((3, 0.2), (2, 0.35), (1, 0.55))  # (frames ago, opacity) of the faded copies behind a mover


def _positions(motion, lane, n):
    """Top-left corners (x, y) of a thing over the n frames of its turn, on `lane` (its y when it
    moves left/right or stays still, its x when it moves up/down); a move travels HI - LO pixels."""
    if motion == "still":
        return [((LO + HI) // 2, lane)] * n
    dx, dy = MOTIONS[motion]
    start, stop = (LO, HI) if dx + dy > 0 else (HI, LO)
    steps = np.linspace(start, stop, n).round().astype(int)
    return [(int(s), lane) if dx else (lane, int(s)) for s in steps]


NOSE = (255, 255, 255)  # a white 2 x 3 pixel block on the side a mover heads to


def _nose(motion, x, y):
    """The rows and columns ((y0, y1), (x0, x1)) of the nose of a thing at (x, y) that moves so:
    just outside its leading edge, centred across it (a still frame shows which way a runner faces)."""
    mid = slice(OBJ // 2 - 1, OBJ // 2 + 2)
    dx, dy = MOTIONS[motion]

    def lead(p, d):  # the two pixels just past the leading edge
        return (p + OBJ, p + OBJ + 2) if d > 0 else (p - 2, p)
    rows = lead(y, dy) if dy else (y + mid.start, y + mid.stop)
    cols = lead(x, dx) if dx else (x + mid.start, x + mid.stop)
    return tuple(max(0, a) for a in rows), tuple(max(0, a) for a in cols)


def _copies(t, x, y):
    """Top-left corners of the t.count copies of thing t at (x, y): side by side across its motion."""
    across_y = t.motion in ("left", "right", "still")
    for c in range(t.count):
        off = (c - (t.count - 1) / 2) * (OBJ + 2)
        yield (int(np.clip(x if across_y else x + off, 0, SIZE - OBJ)), int(np.clip(y + off if across_y else y, 0, SIZE - OBJ)))


def render(scene, seed=0, palette=None, texture=0.0, noise=0.0):
    """uint8 frames (FRAMES, SIZE, SIZE, 3) that show `scene`.

    Things without a relation take turns (np.array_split of the frames); before its turn a thing
    waits at its start, after it at its end. A moving thing has a white nose on its leading side in
    every frame (NOSE, `_nose`) and leaves a fading trail (TRAIL, motion blur in a way): one frame
    shows which way it moves, but not when. palette replaces COLOURS;
    texture (0..1) darkens every other pair of rows of the objects; noise is the std of Gaussian
    pixel noise. The defaults draw a "real" clip."""
    rng = np.random.default_rng(seed)
    colours = palette or COLOURS
    frames = np.empty((FRAMES, SIZE, SIZE, 3), np.float32)
    frames[:] = 25 + rng.integers(0, 15, (1, SIZE, SIZE, 1))  # a faint, still background texture
    n = len(scene.things)
    if scene.relation:  # the mover's lane is above (smaller y) or below the still thing's
        top, bottom = LO, HI
        lanes = [top, bottom] if scene.relation == "above" else [bottom, top]
        turns = [range(FRAMES)] * 2
    else:  # events in random lanes: the order of the events is not where they are
        lanes = [(LO + HI) // 2] if n == 1 else rng.permutation(np.linspace(LO, HI, n).round().astype(int)).tolist()
        turns = [range(t[0], t[-1] + 1) for t in np.array_split(np.arange(FRAMES), n)]
    obj = np.zeros((FRAMES, SIZE, SIZE), bool)
    for t, lane, turn in zip(scene.things, lanes, turns):
        track = _positions(t.motion, lane, len(turn))

        def at(f, track=track, turn=turn):  # where the thing is at frame f (still before and after its turn)
            return track[min(max(f - turn.start, 0), len(turn) - 1)]
        m = _mask(t.shape)
        for f in range(FRAMES):
            for lag, alpha in TRAIL:
                if at(f - lag) != at(f):
                    for cx, cy in _copies(t, *at(f - lag)):
                        patch = frames[f, cy: cy + OBJ, cx: cx + OBJ]
                        patch[m] = (1 - alpha) * patch[m] + alpha * np.array(colours[t.colour], np.float32)
            for cx, cy in _copies(t, *at(f)):
                frames[f, cy: cy + OBJ, cx: cx + OBJ][m] = colours[t.colour]
                obj[f, cy: cy + OBJ, cx: cx + OBJ] |= m
                if t.motion != "still":  # its nose: which way it heads, in every frame
                    (y0, y1), (x0, x1) = _nose(t.motion, cx, cy)
                    frames[f, y0:y1, x0:x1] = NOSE
    if texture:  # stripes on the objects only
        stripes = np.where(np.arange(SIZE) % 4 < 2, 1 - texture, 1.0)[None, :, None, None]
        frames = np.where(obj[..., None], frames * stripes, frames)
    if noise:
        frames = frames + rng.normal(0, noise, frames.shape)
    return frames.clip(0, 255).astype(np.uint8)


# =================================================================================================
# The toy world's datasets, written in the layouts of the real ones (04_eval.py needs no special case)
# =================================================================================================
def write_clip(root, name, scene, seed):
    """Render a real clip of `scene` to <root>/videos/<name>.mp4 (skipped if there); its videopath."""
    from synvita.video_io import write_video
    path = f"videos/{name}.mp4"
    if not os.path.exists(os.path.join(root, path)):
        write_video(os.path.join(root, path), render(scene, seed=seed), fps=8)
    return path


def triplets(root, prefix, n, rng, split, bias=False):
    """n VideoCon-layout rows (videopath, caption, neg_caption, misalignment, split): one real clip
    and one negative of a pick_type type each. With `bias` no clip moves up or down, and an action
    edit of a single thing always swaps in "up" or "down" (as VideoCon's LLM swaps in a sombrero)."""
    rows = []
    for i in range(n):
        scene = random_scene(rng, vertical=not bias)
        kind = pick_type(scene, rng)
        neg = negative(scene, kind, rng, NEGATIVE_ONLY if bias else tuple(MOTIONS))
        rows.append({"videopath": write_clip(root, f"{prefix}{i:05d}", scene, rng.randrange(2**31)),
                     "caption": caption(scene), "neg_caption": caption(neg),
                     "misalignment": kind, "split": split})
    return rows


def temporal_retrieval(root, rng, groups=8, per_variant=(4, 2)):
    """An SSv2-Temporal-like set (videopath, caption, match): queries that differ only in temporal
    direction or order. A single-thing group has 4 direction variants; a two-thing group 8 (order x
    each one's direction, left/right). Every variant is a query over all of its group's clips
    (per_variant clips of each variant: 4 x 4 = 8 x 2 = 16 candidates), its own clips the matches."""
    combos = [(c, s) for c in COLOURS for s in SHAPES]
    rng.shuffle(combos)
    pairs = [(a, b) for i, a in enumerate(combos) for b in combos[i + 1:]]
    rng.shuffle(pairs)
    families = [[Scene((Thing(*combos[g], m),)) for m in MOTIONS] for g in range(groups)]
    families += [[Scene((Thing(*x, mx), Thing(*y, my))) for (x, y) in (ab, ab[::-1])
                  for mx in ("left", "right") for my in ("left", "right")] for ab in pairs[:groups]]
    rows = []
    for g, variants in enumerate(families):
        k = per_variant[len(variants[0].things) - 1]
        clips = [(write_clip(root, f"ssv2_{g:02d}_{v}_{j}", scene, rng.randrange(2**31)), v)
                 for v, scene in enumerate(variants) for j in range(k)]
        rows += [{"videopath": path, "caption": caption(query), "match": int(v == q)}
                 for q, query in enumerate(variants) for path, v in clips]
    return rows


def wrong_statements(scene, temporal):
    """The statements that are false of a two-event scene and differ from its caption in order or
    directions (temporal) or in one thing's colour or shape (not temporal)."""
    a, b = scene.things
    if temporal:
        out = {caption(Scene((replace(x, motion=mx), replace(y, motion=my))))
               for x, y in ((a, b), (b, a)) for mx in ("left", "right") for my in ("left", "right")}
    else:
        edits = [dict(colour=c) for c in COLOURS] + [dict(shape=s) for s in SHAPES]
        out = {caption(Scene((replace(a, **e), b))) for e in edits} | {caption(Scene((a, replace(b, **e)))) for e in edits}
    return sorted(out - {caption(scene)})


def multiple_choice(root, rng, n=60):
    """An ATP-Hard-like set (videopath, question, answer, option, caption) of two-event clips with 5
    statements each, and its question types (video, question, type) as in NExT-QA's file: "T..."
    questions, whose wrong statements change the order or a direction, and "C..." ones, whose wrong
    statements change a colour or a shape."""
    rows, types = [], []
    for i in range(n):
        scene = random_scene(rng, "sequence")
        video = write_clip(root, f"atp_{i:04d}", scene, rng.randrange(2**31))
        temporal = i % 2 == 0
        options = rng.sample(wrong_statements(scene, temporal), 4)
        answer = rng.randrange(5)
        options.insert(answer, caption(scene))
        question = "what happens in the video" if temporal else "what is in the video"
        rows += [{"videopath": video, "question": question, "answer": answer, "option": o, "caption": text}
                 for o, text in enumerate(options)]
        types.append({"video": f"atp_{i:04d}", "question": question, "type": "TN" if temporal else "CW"})
    return rows, types


def world_files(root, seed):
    """The paths of the world's CSVs: the seed's training triplets and the test sets."""
    return {"train": os.path.join(root, f"train_s{seed}.csv"), "videocon_llm": os.path.join(root, "videocon_test.csv"),
            "ssv2_temporal": os.path.join(root, "ssv2_temporal.csv"), "atphard": os.path.join(root, "atphard.csv")}


def write_world(root, seed, n_train=400, n_test=300, ssv2_groups=8, atp_questions=60, bias=True):
    """The toy world's files under root (videos/ + CSVs; every videopath is relative to root):
    train_s<seed>.csv (real triplets; with `bias`, no clip moves up or down), and, the same for
    every seed and both worlds (drawn from seed 10**6): videocon_test.csv, ssv2_temporal.csv (16
    candidates a query), atphard.csv + nextqa-atphard.csv (see world_files)."""
    from synvita.disk import write_csv
    files = world_files(root, seed)
    if not os.path.exists(files["train"]):
        write_csv(files["train"], triplets(root, f"train_s{seed}_", n_train, random.Random(seed), "train", bias))
    if not os.path.exists(files["atphard"]):  # the test sets, written last: their presence means all are there
        rng = random.Random(10**6)
        write_csv(files["videocon_llm"], triplets(root, "test_", n_test, rng, "test"))
        write_csv(files["ssv2_temporal"], temporal_retrieval(root, rng, ssv2_groups))
        atp, types = multiple_choice(root, rng, atp_questions)
        write_csv(os.path.join(root, "nextqa-atphard.csv"), types)
        write_csv(files["atphard"], atp)
    return files
