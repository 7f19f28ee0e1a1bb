"""toyworld.py: the whole SynViTA method on a laptop CPU in minutes (the classroom's world).

Short clips (32x32 pixels, 8 frames) of coloured shapes that move, captioned by templates, with
negative captions of all seven VideoCon misalignment types, and a toy text-to-video "generator"
that shows the two faults the paper blames on real generators (§4, Fig. 2):

- an appearance gap: synthetic clips look unlike real ones (another palette, texture, noise);
- semantic failures: with a rate that depends on the misalignment type, the clip gets an aspect of
  its caption wrong; on a negative caption a failure of its own type draws the REAL caption
  instead (flip and hallucination fail most).

The same four stage scripts run on it, unchanged: the world is written in the real files' layouts
(VideoCon triplets, an SSv2-Temporal-like retrieval set, an ATP-Hard-like multiple-choice set),
01_generate.py runs `toyworld:ToyGenerator` by name, 02_weight.py and 03/04 load the toy models
(pretrained here, from scratch, on real toy clips; committed in toymodels/) by path, like hub
checkpoints.

Launch (the Table 3/4 comparison over three seeds, two stage processes at a time on a 2-core CPU;
reruns reuse every finished step; 7-9 minutes a seed, measured):
    python toyworld.py --out_dir runs/toy --seeds 0 1 2
    python toyworld.py --out_dir runs/toy-perfect --fail_flip 0 --fail_hallucination 0   # a perfect G for those
Pretrain the toy models anew into another folder (seeded; measured at one thread each: 17 minutes for the
base, 3-5 minutes per VQA member), then use them:
    python toyworld.py --models runs/toymodels --seeds
    python toyworld.py --models runs/toymodels --out_dir runs/toy-mine
Exercise: add a weighting to common.WEIGHTINGS (the EXERCISE: dict) and a row for it to METHODS, then
rerun the same command: only the new row is trained and evaluated (about 2 minutes a seed).

    from toyworld import random_scene, negative, caption, parse_caption, render, ToyGenerator
"""
import os
import random
import re
import sys
from dataclasses import dataclass, field, replace
from types import SimpleNamespace

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
    if shape == "circle":  # a ring: a filled disc would differ from the square by 12 corner pixels
        r2 = (x - c) ** 2 + (y - c) ** 2
        return (r2 >= (c - 1.5) ** 2) & (r2 <= (c + 0.5) ** 2)
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


def _copies(t, x, y):
    """Top-left corners of the t.count copies of thing t at (x, y): side by side across its motion."""
    across_y = t.motion in ("left", "right", "still")
    for c in range(t.count):
        off = (c - (t.count - 1) / 2) * (OBJ + 2)
        yield (int(np.clip(x if across_y else x + off, 0, SIZE - OBJ)), int(np.clip(y + off if across_y else y, 0, SIZE - OBJ)))


def render(scene, seed=0, palette=None, texture=0.0, noise=0.0):
    """uint8 frames (FRAMES, SIZE, SIZE, 3) that show `scene`.

    Things without a relation take turns (np.array_split of the frames); before its turn a thing
    waits at its start, after it at its end; a moving thing leaves a fading trail. palette replaces
    COLOURS; texture (0..1) darkens every other pair of rows of the objects; noise is the std of
    Gaussian pixel noise. The defaults draw a "real" clip."""
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
        at = lambda f: track[min(max(f - turn.start, 0), len(turn) - 1)]  # noqa: E731
        m = _mask(t.shape)
        for f in range(FRAMES):
            # a motion trail: faded copies where the thing was 2 and 1 frames ago (motion blur,
            # in a way); it shows the direction of a move in a single frame, as blur does
            for lag, alpha in ((2, 0.25), (1, 0.5)):
                if at(f - lag) != at(f):
                    for cx, cy in _copies(t, *at(f - lag)):
                        patch = frames[f, cy: cy + OBJ, cx: cx + OBJ]
                        patch[m] = (1 - alpha) * patch[m] + alpha * np.array(colours[t.colour], np.float32)
            for cx, cy in _copies(t, *at(f)):
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
# flip, relation and hallucination). With the defaults, Eq. 4's per-type mean weights come out as in
# the paper's Fig. 2 at the low end: flip and hallucination among the lowest (with action, whose
# direction the frame VQA models hardly see), attribute and count highest (README has the numbers).
FAILURE_RATES = {"action": 0.15, "attribute": 0.05, "object": 0.05, "count": 0.15, "relation": 0.3,
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
    """The toy world's text-to-video "model" G: caption in, clip out. 01_generate.py runs it by name
    (--pipeline toyworld:ToyGenerator, its fields as --pipeline_kwargs JSON), like a diffusers pipeline.

    failure_rates: per misalignment type, the rate of the semantic failure named after it;
    palette, texture, noise: the appearance gap (False, 0, 0 draw clips that look real)."""
    failure_rates: dict = field(default_factory=lambda: dict(FAILURE_RATES))
    palette: bool = True
    texture: float = 0.5
    noise: float = 12.0
    # what 01_generate.py uses where a flag is 0 (its PIPELINE_DEFAULTS for diffusers pipelines)
    defaults = dict(num_inference_steps=1, guidance_scale=1.0, height=SIZE, width=SIZE, num_frames=FRAMES, fps=8)

    def draw(self, prompt, seed=0):
        """V^s = G(t^s, noise): uint8 frames (FRAMES, SIZE, SIZE, 3) drawn for caption `prompt`."""
        drawn, _ = corrupt(parse_caption(prompt), self.failure_rates, random.Random(seed))
        return render(drawn, seed=seed, palette=SYNTHETIC_PALETTE if self.palette else None,
                      texture=self.texture, noise=self.noise)

    def __call__(self, prompt, generator=None, height=SIZE, width=SIZE, num_frames=FRAMES, **unused):
        """The diffusers call: the seed comes from the torch.Generator; frames[0] in [0, 1]."""
        if (num_frames, height, width) != (FRAMES, SIZE, SIZE):
            raise ValueError(f"ToyGenerator draws {FRAMES} frames of {SIZE}x{SIZE}, not {num_frames} of {height}x{width}")
        frames = self.draw(prompt, seed=generator.initial_seed() if generator is not None else 0)
        return SimpleNamespace(frames=[frames.astype(np.float32) / 255])


# =================================================================================================
# The toy world's datasets, written in the layouts of the real ones (04_eval.py needs no special case)
# =================================================================================================
def write_clip(root, name, scene, seed):
    """Render a real clip of `scene` to <root>/videos/<name>.mp4 (skipped if there); its videopath."""
    from common import write_video
    path = f"videos/{name}.mp4"
    if not os.path.exists(os.path.join(root, path)):
        write_video(os.path.join(root, path), render(scene, seed=seed), fps=8)
    return path


def triplets(root, prefix, n, rng, split):
    """n VideoCon-layout rows (videopath, caption, neg_caption, misalignment, split): one real clip
    and one negative of a random applicable type each."""
    rows = []
    for i in range(n):
        scene = random_scene(rng)
        kind = rng.choice(negative_types(scene))
        rows.append({"videopath": write_clip(root, f"{prefix}{i:05d}", scene, rng.randrange(2**31)),
                     "caption": caption(scene), "neg_caption": caption(negative(scene, kind, rng)),
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


def write_world(root, seed, n_train=400, n_test=300, ssv2_groups=8, atp_questions=60):
    """The toy world's files under root (videos/ + CSVs; every videopath is relative to root):
    train_s<seed>.csv (real triplets), and, the same for every seed (drawn from seed 10**6):
    videocon_test.csv, ssv2_temporal.csv (16 candidates a query), atphard.csv + nextqa-atphard.csv."""
    from common import write_csv
    files = {"train": os.path.join(root, f"train_s{seed}.csv"), "videocon_llm": os.path.join(root, "videocon_test.csv"),
             "ssv2_temporal": os.path.join(root, "ssv2_temporal.csv"), "atphard": os.path.join(root, "atphard.csv")}
    if not os.path.exists(files["train"]):
        write_csv(files["train"], triplets(root, f"train_s{seed}_", n_train, random.Random(seed), "train"))
    if not os.path.exists(files["atphard"]):  # the test sets, written last: their presence means all are there
        rng = random.Random(10**6)
        write_csv(files["videocon_llm"], triplets(root, "test_", n_test, rng, "test"))
        write_csv(files["ssv2_temporal"], temporal_retrieval(root, rng, ssv2_groups))
        atp, types = multiple_choice(root, rng, atp_questions)
        write_csv(os.path.join(root, "nextqa-atphard.csv"), types)
        write_csv(files["atphard"], atp)
    return files


# =================================================================================================
# The toy world's models: a tiny Video-LLaVA pretrained on real toy clips (the base f for 03/04)
# =================================================================================================
PROMPT_WORDS = ["USER", ":", "ASSISTANT", "Does", "this", "video", "figure", "show", "entail", "the", "description",
                '"', "?", "Please", "answer", "yes", "or", "no", ".", "Yes", "No", ","]


def toy_vocabulary():
    words = [*PROMPT_WORDS, *COUNTS.values(), *COLOURS, *SHAPES, *(s + "s" for s in SHAPES), *MOTIONS,
             "moves", "move", "then", "above", "below"]
    return list(dict.fromkeys(words))


def build_tokenizer():
    """A word-level tokenizer over the toy world's closed vocabulary (punctuation split off)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast
    special = ["<unk>", "<s>", "</s>", "<pad>", "<video>", "<image>"]
    vocab = {w: i for i, w in enumerate(special + toy_vocabulary())}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok.add_special_tokens(special)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>", extra_special_tokens={"video_token": "<video>", "image_token": "<image>"})


def clip_llama_configs(tokenizer, size=SIZE, patch=8, hidden=64, text_layers=3, vision_layers=2):
    """The configs of a toy CLIP vision tower and LLaMA language model (width
    hidden) for size x size frames: the two halves of a toy (Video-)LLaVA."""
    from transformers import CLIPVisionConfig, LlamaConfig
    vision = CLIPVisionConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=vision_layers,
                              num_attention_heads=2, image_size=size, patch_size=patch)
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                       num_hidden_layers=text_layers, num_attention_heads=4, num_key_value_heads=4,
                       max_position_embeddings=1024, pad_token_id=tokenizer.pad_token_id,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    return vision, text


def new_video_llava(tokenizer, size=SIZE, patch=8, seed=0, **sizes):
    """A randomly initialised Video-LLaVA at toy size and its processor, for size x size frames.
    sizes: hidden, text_layers, vision_layers (see clip_llama_configs)."""
    import torch
    from transformers import (VideoLlavaConfig, VideoLlavaForConditionalGeneration, VideoLlavaImageProcessor,
                              VideoLlavaProcessor, VideoLlavaVideoProcessor)
    torch.manual_seed(seed)
    vision, text = clip_llama_configs(tokenizer, size, patch, **sizes)
    config = VideoLlavaConfig(vision_config=vision, text_config=text, vision_feature_layer=-2,
                              video_token_id=tokenizer.convert_tokens_to_ids("<video>"),
                              image_token_id=tokenizer.convert_tokens_to_ids("<image>"))
    resize, crop = {"shortest_edge": size}, {"height": size, "width": size}
    processor = VideoLlavaProcessor(VideoLlavaImageProcessor(size=resize, crop_size=crop),
                                    VideoLlavaVideoProcessor(size=resize, crop_size=crop), tokenizer, patch_size=patch)
    return VideoLlavaForConditionalGeneration(config).eval(), processor


def new_llava(tokenizer, size=SIZE, patch=8, seed=0, **sizes):
    """A randomly initialised LLaVA-1.5 at toy size (an IMAGE model, for 02_weight.py's VQA
    ensemble) and its processor, with llava-1.5's chat template "USER: <image>\\n... ASSISTANT:"."""
    import torch
    from transformers import CLIPImageProcessor, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor
    torch.manual_seed(seed)
    vision, text = clip_llama_configs(tokenizer, size, patch, **sizes)
    config = LlavaConfig(vision_config=vision, text_config=text, vision_feature_layer=-2,
                         vision_feature_select_strategy="default", image_token_id=tokenizer.convert_tokens_to_ids("<image>"))
    image_processor = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=patch,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1,
                               chat_template=LLAVA_TEMPLATE)
    return LlavaForConditionalGeneration(config).eval(), processor


# the shape of llava-hf/llava-1.5-7b-hf's chat template: "USER: <image>\n<text> ASSISTANT:"
LLAVA_TEMPLATE = (
    "{% for m in messages %}{{ m['role'].upper() + ': ' }}"
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}{{ '<image>\n' }}{% endif %}{% endfor %}"
    "{% for c in m['content'] %}{% if c['type'] == 'text' %}{{ c['text'] + ' ' }}{% endif %}{% endfor %}"
    "{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}")
PROMPT = "card"  # the committed toy base was pretrained on Video-LLaVA's model-card prompt (no system sentence)
VQA_QUESTION = 'Does this figure show "{caption}"? Please answer yes or no.'  # 02_weight.py's question


# ---- pretraining data: real clips, written to mp4 and decoded, as the stages will see them -------
def clip_pool(root, n, seed):
    """n real clips (scenes of random_scene) written under root and decoded again with the stages'
    reader (H.264 changes the pixels a little) -> (scenes, uint8 array (n, FRAMES, SIZE, SIZE, 3))."""
    from common import read_video
    rng = random.Random(seed)
    scenes = [random_scene(rng) for _ in range(n)]
    paths = [write_clip(root, f"pool_{i:05d}", s, rng.randrange(2**31)) for i, s in enumerate(scenes)]
    return scenes, np.stack([read_video(os.path.join(root, p), FRAMES) for p in paths])


def pretraining_batch(scenes, clips, rng, n, easy, types=TYPES):
    """n pool clips with their caption and a negative each: with probability `easy` (or when none
    of `types` applies) the caption of another random scene (an easy negative), else a minimal edit
    of a random applicable type among `types`."""
    idx = [rng.randrange(len(scenes)) for _ in range(n)]
    pos, neg = [caption(scenes[i]) for i in idx], []
    for i in idx:
        kinds = [k for k in negative_types(scenes[i]) if k in types]
        hard = kinds and rng.random() >= easy
        neg.append(caption(negative(scenes[i], rng.choice(kinds), rng) if hard else random_scene(rng)))
    return clips[idx], pos, neg


def caption_losses(logits, ids, n_pos, yes, no, quote, pad):
    """Two dense losses over the quoted caption of n_pos positive prompts (rows [:n_pos]) and their
    negatives (rows [n_pos:], left-padded like them):

    - the caption LM loss: predict each word of the positive caption (grounds the words);
    - the prefix loss: at every position from the opening quote on, logit(Yes) - logit(No) says
      whether the caption read so far is still the true one (1 up to the first token where the
      negative departs from the caption, 0 from there on). It teaches where a caption goes wrong,
      which Eq. (2)'s single answer at the end of the prompt teaches only very slowly."""
    import torch
    import torch.nn.functional as F
    inside = (ids[:n_pos] == quote).cumsum(1) == 1  # the opening quote and the caption's words
    l_lm = F.cross_entropy(logits[:n_pos, :-1].transpose(1, 2), torch.where(inside[:, 1:], ids[:n_pos, 1:], -100))
    labels = torch.full(ids.shape, -1.0)
    width = ids.shape[1]
    for j in range(n_pos):
        p, n = [t for t in ids[j].tolist() if t != pad], [t for t in ids[n_pos + j].tolist() if t != pad]
        first = next((k for k, (a, b) in enumerate(zip(p, n)) if a != b), min(len(p), len(n)))
        q = p.index(quote)
        labels[j, width - len(p) + q:] = 1.0
        labels[n_pos + j, width - len(n) + q:] = (torch.arange(q, len(n)) < first).float()
    keep = labels >= 0
    l_prefix = F.binary_cross_entropy_with_logits((logits[..., yes] - logits[..., no])[keep], labels[keep])
    return l_lm, l_prefix


def video_llm_losses(model, processor, clips, pos, neg):
    """The base video LLM's pretraining losses: Eq. (2) on f(V, t^r) vs f(V, t^neg) and the
    caption_losses, in VideoCon's prompt."""
    import torch
    from transformers.modeling_outputs import BaseModelOutputWithPooling
    from common import build_text_batch, encode_videos, loss_real
    features = encode_videos(model, processor, list(clips))  # (B, L, hidden)
    ids, mask, positions, (yes, no) = build_text_batch(model, processor, pos + neg, features.shape[1], prompt=PROMPT)
    video = BaseModelOutputWithPooling(pooler_output=torch.cat([features, features]))
    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, mm_encoder_outputs={"video": video}).logits
    a = logits[:, -1, yes] - logits[:, -1, no]
    tok = processor.tokenizer
    return (loss_real(a[: len(pos)], a[len(pos):]),
            *caption_losses(logits, ids, len(pos), yes, no, tok.convert_tokens_to_ids('"'), tok.pad_token_id))


def vqa_losses(model, processor, clips, pos, neg, rng=random):
    """A frame VQA model's pretraining losses on one random frame per clip: the cross-entropy of
    answering "Yes" (caption) / "No" (negative) over the whole vocabulary, as VQAScore reads P(Yes),
    and the caption_losses, in 02_weight.py's VQAScore prompt."""
    import torch
    import torch.nn.functional as F
    frames = [clip[rng.randrange(FRAMES)] for clip in clips]
    chat = lambda c: [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": VQA_QUESTION.format(caption=c)}]}]  # noqa: E731
    prompts = [processor.apply_chat_template(chat(c), add_generation_prompt=True) for c in pos + neg]
    inputs = processor(images=frames + frames, text=prompts, padding=True, padding_side="left", return_tensors="pt")
    logits = model(**inputs).logits
    tok = processor.tokenizer
    yes, no = tok.convert_tokens_to_ids("Yes"), tok.convert_tokens_to_ids("No")
    answers = torch.tensor([yes] * len(pos) + [no] * len(neg))
    return (F.cross_entropy(logits[:, -1], answers),
            *caption_losses(logits, inputs["input_ids"], len(pos), yes, no, tok.convert_tokens_to_ids('"'), tok.pad_token_id))


def pretrain(out_dir, kind="video", steps=3000, batch_size=16, lr=1e-3, pool=3000, seed=0, types=TYPES, log_every=100,
             pool_dir=None, **sizes):
    """Pretrain a toy model from scratch on real toy clips and save it (model + processor) to
    out_dir, where the stages load it by path like a hub checkpoint. kind: "video" (the base video
    LLM f of 03/04, a toy Video-LLaVA) or "vqa" (one member of 02's VQA ensemble, a toy LLaVA-1.5
    that sees one frame). types: the misalignment types of the hard negatives. pool_dir: where the
    pool's clips are written (default: <out_dir>/../pool). sizes: hidden, text_layers, vision_layers,
    patch.

    Loss: the answer loss (Eq. 2 for "video") + the two caption_losses (LM and prefix); negatives
    start as captions of other clips (easy) and become minimal edits of the seven types over the
    first half; AdamW, 100 warm-up steps, cosine decay, gradient clipping at 1. From scratch, Eq. (2)
    on minimal edits alone stays at chance for thousands of steps; README's toy-world section has
    what this recipe measured."""
    import math
    import torch
    from common import progress, save_json, seed_everything
    seed_everything(seed)
    patch = sizes.pop("patch", 8)
    new = new_video_llava if kind == "video" else new_llava
    model, processor = new(build_tokenizer(), patch=patch, seed=seed, **sizes)
    pool_dir = pool_dir or os.path.join(os.path.dirname(os.path.abspath(out_dir)), "pool")
    scenes, clips = clip_pool(pool_dir, pool, seed=10**5)
    losses = video_llm_losses if kind == "video" else vqa_losses
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 100) * 0.5 * (1 + math.cos(math.pi * s / steps)))
    rng, log = random.Random(seed), []
    for step in progress(range(steps), total=steps, desc=f"pretrain toy {kind} model {os.path.basename(out_dir)}"):
        easy = 0.5 * max(0.0, 1 - 2 * step / steps)
        l_answer, l_lm, l_prefix = losses(model, processor, *pretraining_batch(scenes, clips, rng, batch_size, easy, types))
        opt.zero_grad()
        (l_answer + l_lm + l_prefix).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        schedule.step()
        if (step + 1) % log_every == 0 or step + 1 == steps:
            log.append({"step": step + 1, **{k: round(v.item(), 4) for k, v in
                                             (("answer", l_answer), ("lm", l_lm), ("prefix", l_prefix))}})
    model.eval()
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    save_json(os.path.join(out_dir, "pretrain.json"), {"kind": kind, "steps": steps, "batch_size": batch_size, "lr": lr,
                                                     "pool": pool, "seed": seed, "types": list(types), "sizes": sizes, "patch": patch, "log": log})
    return out_dir


def per_type_auc(labels, scores, kinds):
    """ROC-AUC (%) overall and per misalignment type; labels 1 = caption, 0 = its negative."""
    from sklearn.metrics import roc_auc_score
    labels, scores, kinds = np.asarray(labels), np.asarray(scores), np.asarray(kinds)
    return {k: 100 * float(roc_auc_score(labels[keep], scores[keep]))
            for k, keep in [("all", kinds == kinds), *((k, kinds == k) for k in TYPES)] if len(set(labels[keep])) == 2}


def entailment_auc(model, processor, n=256, seed=12345):
    """A quick check of a base video LLM: per_type_auc of f on n freshly rendered clips, each with
    its caption and one negative of a random applicable type."""
    import torch
    from common import alignment_logits
    rng = random.Random(seed)
    scenes = [random_scene(rng) for _ in range(n)]
    kinds = [rng.choice(negative_types(s)) for s in scenes]
    videos = [render(s, seed=rng.randrange(2**31)) for s in scenes]
    texts = [caption(s) for s in scenes] + [caption(negative(s, k, rng)) for s, k in zip(scenes, kinds)]
    with torch.no_grad():
        f = torch.cat([alignment_logits(model, processor, [videos[i % n] for i in range(j, min(j + 32, 2 * n))],
                                        texts[j: j + 32], prompt=PROMPT) for j in range(0, 2 * n, 32)]).numpy()
    return per_type_auc([1] * n + [0] * n, f, kinds + kinds)


# =================================================================================================
# The one command: 01 -> 02 -> 03 -> 04 on the toy world, Table 3/4 and Fig. 2 over several seeds
# =================================================================================================
HERE = os.path.dirname(os.path.abspath(__file__))
# Table 3/4 rows -> 03_train.py's flags (None: the base model, not fine-tuned; 04 only)
METHODS = {
    "base, no fine-tuning (zero-shot)": None,
    "VideoCon: L_real (Eq. 2)": ["--no-use_syn"],
    "+ V^s unweighted (Eq. 3)": ["--weighting", "fixed", "--no-use_scr"],
    "T4.1 fixed + L_scr": ["--weighting", "fixed"],
    "T4.2 target + L_scr": ["--weighting", "target"],
    "T4.3 target_x_inv_real + L_scr": ["--weighting", "target_x_inv_real"],
    "T4.4 indicator + L_scr": ["--weighting", "indicator"],
    "SynViTA: T4.5 difference (Eq. 4) + L_scr": ["--weighting", "difference"],
}
# the toy VQA ensemble of 02 (fbar): three frame models that differ in depth, width and seed
VQA_MEMBERS = [dict(text_layers=3, vision_layers=3, seed=1), dict(text_layers=4, vision_layers=3, seed=2),
               dict(hidden=96, text_layers=3, vision_layers=3, seed=3)]
BASE_SIZES = dict(text_layers=4, vision_layers=3)  # vision_layers=2 left shapes at chance (the LLM reads layer -2)
COLUMNS = [("VideoCon-like AUC", "videocon_llm", "auc"), ("SSv2-T-like mAP", "ssv2_temporal", "mAP"),
           ("ATP-like acc", "atphard", "accuracy"), ("ATP-T acc", "atphard", "accuracy_T")]


@dataclass
class Args:
    out_dir: str = "runs/toy"
    """world/, seed<N>/, eval_base/ and the table go here"""
    models: str = os.path.join(HERE, "toymodels")
    """the pretrained toy models (base_video_llava/, vqa_0..2/), committed; pretrained into this
    folder when it has none (give another folder to pretrain anew)"""
    seeds: list = field(default_factory=lambda: [0, 1, 2])
    """each seed draws its own real training set, synthetic videos and LoRA initialisation"""
    methods: list = field(default_factory=lambda: list(METHODS))
    """the rows of the table (keys of METHODS)"""
    n_train: int = 400
    """real training triplets per seed (VideoCon layout, one negative each)"""
    n_test: int = 300
    """VideoCon-like entailment test rows"""
    ssv2_groups: int = 8
    """SSv2-Temporal-like groups of each kind (one thing: 4 queries; two things: 8; 16 candidates each)"""
    atp_questions: int = 60
    """ATP-Hard-like questions (half temporal, half about colour/shape), 5 statements each"""
    fail_action: float = FAILURE_RATES["action"]
    """G's rate of drawing the first thing moving another way"""
    fail_attribute: float = FAILURE_RATES["attribute"]
    """G's rate of drawing the first thing in another colour"""
    fail_object: float = FAILURE_RATES["object"]
    """G's rate of drawing the first thing as another shape"""
    fail_count: float = FAILURE_RATES["count"]
    """G's rate of drawing another number of copies"""
    fail_relation: float = FAILURE_RATES["relation"]
    """G's rate of swapping above and below"""
    fail_flip: float = FAILURE_RATES["flip"]
    """G's rate of drawing the events in another order"""
    fail_hallucination: float = FAILURE_RATES["hallucination"]
    """G's rate of leaving out the last event"""
    palette: bool = True
    """appearance gap: G draws in its own palette"""
    texture: float = 0.5
    """appearance gap: G's stripes on objects (0..1)"""
    noise: float = 12.0
    """appearance gap: std of G's pixel noise"""
    base_steps: int = 3000
    """pretraining steps of the base video LLM (when --models has none)"""
    base_types: list = field(default_factory=lambda: list(TYPES))
    """misalignment types of the base video LLM's pretraining negatives"""
    vqa_steps: int = 2000
    """pretraining steps of each VQA ensemble member (when --models has none)"""
    pool: int = 3000
    """real clips in the pretraining pool"""
    # NOTE (deviation): 03_train.py's paper settings (lr 5e-5, batch 32, 1 epoch, 200 warm-up steps) are
    # for a 7B model on all of VideoCon; the toy world fine-tunes 400 rows for 50 steps at these instead.
    lr: float = 1e-3
    """03's LoRA learning rate (the paper's 5e-5 is for 7B models and 1000s of steps)"""
    num_epochs: int = 2
    """03's passes over the training CSV"""
    batch_size: int = 16
    """03's global batch"""
    threads: int = 2
    """CPU threads in all (each stage process gets threads // jobs)"""
    jobs: int = 2
    """methods trained and evaluated at once (each stage's output then goes to a .log file beside it)"""


def eval_dir(args, seed, method):
    """Where 04_eval.py writes a method's results (the zero-shot base: once for all seeds)."""
    if METHODS[method] is None:
        return os.path.join(args.out_dir, "eval_base")
    return os.path.join(args.out_dir, f"seed{seed}", "eval", re.sub(r"\W+", "_", method).strip("_"))


def stage(args, script, *flags, log=None):
    """Run one of the four stage scripts as a user would; stop on its failure. Its output streams to
    the terminal, or, for a parallel job (log given), to that file, whose end a failure shows."""
    import subprocess
    cmd = [sys.executable, os.path.join(HERE, script), *map(str, flags)]
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, args.threads // args.jobs)), "TOKENIZERS_PARALLELISM": "false"}
    if log is None:
        print(f"\n$ {' '.join(cmd)}", flush=True)
        subprocess.run(cmd, check=True, cwd=HERE, env=env)
        return
    os.makedirs(os.path.dirname(log), exist_ok=True)
    with open(log, "w", encoding="utf-8") as fh:
        fh.write(f"$ {' '.join(cmd)}\n")
        fh.flush()
        code = subprocess.run(cmd, cwd=HERE, env=env, stdout=fh, stderr=subprocess.STDOUT).returncode
    if code:
        with open(log, encoding="utf-8") as fh:
            raise RuntimeError(f"{script} failed (exit {code}); the end of {log}:\n{fh.read()[-3000:]}")


def ensure_models(args):
    """The pretrained toy models in --models (committed to the repo): pretrained there, seeded, when
    missing; the pool of real clips they learn from goes to <out_dir>/pool."""
    base = os.path.join(args.models, "base_video_llava")
    pool_dir = os.path.join(args.out_dir, "pool")
    if not os.path.exists(os.path.join(base, "pretrain.json")):
        pretrain(base, "video", steps=args.base_steps, pool=args.pool, seed=0, types=args.base_types,
                 pool_dir=pool_dir, **BASE_SIZES)
    vqa = []
    for i, sizes in enumerate(VQA_MEMBERS):
        vqa.append(os.path.join(args.models, f"vqa_{i}"))
        if not os.path.exists(os.path.join(vqa[-1], "pretrain.json")):
            pretrain(vqa[-1], "vqa", steps=args.vqa_steps, pool=args.pool, pool_dir=pool_dir, **sizes)
    return base, vqa


def generator_kwargs(args):
    rates = {k: getattr(args, f"fail_{k}") for k in TYPES}
    return {"failure_rates": rates, "palette": args.palette, "texture": args.texture, "noise": args.noise}


def faithful(rows, kwargs):
    """Per synthetic video: did G draw what it was asked (no semantic failure)? Re-derived from its
    seed, exactly as ToyGenerator drew it."""
    return [not corrupt(parse_caption(r["neg_caption"]), kwargs["failure_rates"], random.Random(int(r["seed"])))[1]
            for r in rows]


def run_method(args, seed, method, world, base):
    """03_train.py (unless the method is the base model) then 04_eval.py for one row of the table;
    each step is skipped when its output is there -> 04's results, with the VideoCon-like AUC by type."""
    import json
    from common import read_csv
    flags, ev = METHODS[method], eval_dir(args, seed, method)
    train = None if flags is None else os.path.join(args.out_dir, f"seed{seed}", "train", os.path.basename(ev))
    logged = args.jobs > 1  # parallel jobs write their output to files, not the terminal
    if train and not os.path.exists(os.path.join(train, "adapter", "adapter_config.json")):
        stage(args, "03_train.py", "--train_csv", os.path.join(args.out_dir, f"seed{seed}", "generate", "weighted.csv"),
              "--video_root", os.path.dirname(world["train"]), "--out_dir", train, "--model", base, *flags,
              "--lr", args.lr, "--num_epochs", args.num_epochs, "--batch_size", args.batch_size,
              "--micro_batch_size", min(8, args.batch_size), "--warmup_steps", 5, "--prompt", PROMPT, "--num_workers", 0,
              "--no-bf16", "--no-gradient_checkpointing", "--save_every", 10**6, "--seed", seed,
              log=os.path.join(train, "03_train.log") if logged else None)
    if not os.path.exists(os.path.join(ev, "results.json")):
        stage(args, "04_eval.py", "--model", base, *(["--adapter", os.path.join(train, "adapter")] if train else []),
              "--videocon_llm", world["videocon_llm"], "--ssv2_temporal", world["ssv2_temporal"],
              "--atphard", world["atphard"], "--candidates", 16, "--video_root", os.path.dirname(world["train"]),
              "--batch_size", 32, "--video_batch", 8, "--out_dir", ev, "--prompt", PROMPT,
              log=os.path.join(ev, "04_eval.log") if logged else None)
    with open(os.path.join(ev, "results.json")) as fh:
        results = json.load(fh)["results"]
    test = read_csv(world["videocon_llm"])
    scores = {(r["videopath"], r["caption"]): float(r["score"]) for r in read_csv(os.path.join(ev, "videocon_llm_scores.csv"))}
    results["videocon_llm"]["auc_by_type"] = per_type_auc(
        [1] * len(test) + [0] * len(test), [scores[r["videopath"], r["caption"]] for r in test]
        + [scores[r["videopath"], r["neg_caption"]] for r in test], [r["misalignment"] for r in test] * 2)
    return results


def fig2_stats(args, weighted):
    """Per misalignment type, over 02_weight.py's rows: how many, the share G drew faithfully (no
    semantic failure of any kind), the mean fbar(Vs,ts) - fbar(Vs,tr), and the mean weight (Eq. 4)
    of all, of the faithful and of the failed V^s."""
    ok = faithful(weighted, generator_kwargs(args))
    stats = {}
    for kind in TYPES:
        rows = [(float(r["weight"]), float(r["score_syn_target"]) - float(r["score_syn_real"]), f)
                for r, f in zip(weighted, ok) if r["misalignment"] == kind]
        if rows:
            w, diff, f = map(np.array, zip(*rows))
            stats[kind] = {"n": len(rows), "faithful": float(f.mean()), "diff": float(diff.mean()), "w": float(w.mean()),
                           "w_faithful": float(w[f].mean()) if f.any() else float("nan"),
                           "w_failed": float(w[~f].mean()) if (~f).any() else float("nan")}
    return stats


def run_seed(args, seed, world, base, vqa):
    """01 -> 02 for one seed, then 03 -> 04 for every method (--jobs at a time) -> ({method:
    results}, Fig. 2-style stats)."""
    import json
    import time
    from concurrent.futures import ThreadPoolExecutor
    from common import read_csv
    gen = os.path.join(args.out_dir, f"seed{seed}", "generate")
    if not os.path.exists(os.path.join(gen, "weighted.csv")):
        stage(args, "01_generate.py", "--input_csv", world["train"], "--out_dir", gen, "--seed", seed,
              "--pipeline", "toyworld:ToyGenerator", "--pipeline_kwargs", json.dumps(generator_kwargs(args)))
        stage(args, "02_weight.py", "--generated_csv", os.path.join(gen, "generated.csv"), "--models", *vqa)
    start = time.time()

    def job(i, method):
        if args.jobs == 1:
            print(f"\n==== seed {seed}, method {i + 1}/{len(args.methods)}: {method}", flush=True)
        results = run_method(args, seed, method, world, base)
        if args.jobs > 1:  # a line per finished row (one write: jobs do not cut into each other's lines)
            sys.stdout.write(f"seed {seed}: {method} done after {time.time() - start:.0f} s (AUC "
                             f"{results['videocon_llm']['auc']:.1f}, SSv2-T mAP {results['ssv2_temporal']['mAP']:.1f})\n")
            sys.stdout.flush()
        return results
    if args.jobs > 1:
        print(f"seed {seed}: {len(args.methods)} methods, {args.jobs} at a time (each stage's output goes to a "
              f".log file in its own folder: train/<method>/03_train.log, eval/<method>/04_eval.log)", flush=True)
    with ThreadPoolExecutor(args.jobs) as pool:
        results = dict(zip(args.methods, pool.map(job, range(len(args.methods)), args.methods)))
    return results, fig2_stats(args, read_csv(os.path.join(gen, "weighted.csv")))


def summarise(args, per_seed, fig2s):
    """The Table 3/4-style table (mean ± std over seeds) and the Fig. 2-style per-type table."""
    def cell(values):
        v = [x for x in values if x is not None]
        return f"{np.mean(v):6.2f} ± {np.std(v):5.2f}" if v else f"{'-':>15}"
    lines = [f"| method | {' | '.join(c for c, _, _ in COLUMNS)} |", "|---" * (len(COLUMNS) + 1) + "|"]
    for method in args.methods:
        cells = [cell([r[method].get(task, {}).get(key) for r in per_seed]) for _, task, key in COLUMNS]
        lines.append(f"| {method} | {' | '.join(cells)} |")
    lines += ["", "VideoCon-like AUC by misalignment type (mean over seeds)", "",
              f"| method | {' | '.join(TYPES)} |", "|---" * (len(TYPES) + 1) + "|"]
    for method in args.methods:
        cells = [f"{np.mean([r[method]['videocon_llm']['auc_by_type'].get(k, np.nan) for r in per_seed]):5.1f}" for k in TYPES]
        lines.append(f"| {method} | {' | '.join(cells)} |")
    lines += ["", "Fig. 2-style, per type (mean over seeds): share of V^s drawn faithfully by G, mean fbar(Vs,ts) - "
              "fbar(Vs,tr), mean Eq. 4 weight of all, of the faithful and of the failed V^s", "",
              "| type | n | faithful | fbar diff | w | w faithful | w failed |", "|---|---|---|---|---|---|---|"]
    for kind in TYPES:
        stats = [f[kind] for f in fig2s if kind in f]
        if stats:
            m = {k: np.nanmean([s[k] for s in stats]) for k in stats[0]}
            lines.append(f"| {kind} | {m['n']:.0f} | {m['faithful']:.2f} | {m['diff']:+.3f} | {m['w']:.3f} | {m['w_faithful']:.3f} | {m['w_failed']:.3f} |")
    return "\n".join(lines)


RUN_ONLY = ("seeds", "methods", "threads", "jobs")  # the flags that may change between runs into one out_dir


def check_settings(args):
    """Reruns reuse what an out_dir holds, so its settings must be the same: an error names the
    flags that differ (pick another --out_dir) instead of mixing two worlds in one table."""
    import json
    from common import save_json
    path = os.path.join(args.out_dir, "toyworld_args.json")
    now = {k: v for k, v in vars(args).items() if k not in RUN_ONLY}
    if os.path.exists(path):
        with open(path) as fh:
            before = json.load(fh)
        changed = {k: (before.get(k), v) for k, v in now.items() if before.get(k) != v}
        if changed:
            raise ValueError(f"{args.out_dir} holds a run with other settings {changed} (before, now); "
                             f"use another --out_dir")
    else:
        os.makedirs(args.out_dir, exist_ok=True)
        save_json(path, now)


def main(args):
    import json
    import time
    from common import save_json
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown --methods {unknown}; choose from {list(METHODS)}")
    start = time.time()
    if args.seeds:  # `--seeds` with no value: pretrain the models only, nothing else in out_dir
        check_settings(args)
    # ---- the pretrained toy models (committed; pretrained when --models has none) ----
    base, vqa = ensure_models(args)
    print(f"models ready after {time.time() - start:.0f} s", flush=True)
    if not args.seeds:
        return []
    # ---- per seed: the toy world's files, then 01 -> 02 -> 03 -> 04 ----
    world_root = os.path.join(args.out_dir, "world")
    per_seed, fig2s, times = [], [], {}
    for seed in args.seeds:
        t = time.time()
        world = write_world(world_root, seed, args.n_train, args.n_test, args.ssv2_groups, args.atp_questions)
        results, fig2 = run_seed(args, seed, world, base, vqa)
        per_seed.append(results)
        fig2s.append(fig2)
        timing = os.path.join(args.out_dir, f"seed{seed}", "seconds.json")  # by the run that did the work
        if not os.path.exists(timing):
            save_json(timing, {"seconds": round(time.time() - t, 1), "jobs": args.jobs, "threads": args.threads})
        with open(timing) as fh:
            times[seed] = json.load(fh)
        print(f"seed {seed} done in {time.time() - t:.0f} s", flush=True)
    table = summarise(args, per_seed, fig2s)
    spent = ", ".join(f"seed {k}: {v['seconds']:.0f} s ({v['jobs']} jobs, {v['threads']} threads)" for k, v in times.items())
    header = (f"Toy world, seeds {args.seeds}: mean ± std over seeds (in %; {args.n_train} real triplets per seed; "
              f"{os.cpu_count()} CPU cores; time of the run that did each seed's work: {spent})")
    print("\n" + header + "\n\n" + table, flush=True)
    with open(os.path.join(args.out_dir, "table.md"), "w", encoding="utf-8") as fh:
        fh.write(header + "\n\n" + table + "\n")
    save_json(os.path.join(args.out_dir, "results.json"), {"args": vars(args), "seconds_per_seed": times,
                                                           "results": per_seed, "fig2": fig2s})
    return per_seed


if __name__ == "__main__":
    from common import parse_args
    main(parse_args(Args))
