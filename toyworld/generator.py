"""The toy world's text-to-video generator G (paper §4): caption in, clip out, with the two faults
the paper blames on real generators (Fig. 2):

- an appearance gap: synthetic clips look unlike real ones (another palette, texture, noise);
- semantic failures: with a rate that depends on the misalignment type, the clip gets an aspect of
  its caption wrong; on a negative caption a failure of its own type draws the REAL caption
  instead (flip and hallucination fail most).

01_generate.py runs it by name, like any "module:Class" generator:
    python 01_generate.py --input_csv runs/toy/world/train_s0.csv --out_dir /tmp/gen \\
        --pipeline toyworld.generator:ToyGenerator --pipeline_kwargs '{"noise": 0}'
"""
import random
from dataclasses import dataclass, field, replace
from types import SimpleNamespace

import numpy as np

from toyworld.world import FRAMES, SIZE, TYPES, negative, negative_types, parse_caption, render

# Each semantic failure gets one aspect of the caption it draws wrong, with a rate per aspect named
# after the misalignment type that tests it: a "flip" failure draws the events in another order, a
# "hallucination" failure leaves out the last event, an "action" failure moves the first thing in
# another direction, and so on. On a negative caption, a failure of its own type often draws the
# REAL caption instead (always, for flip, relation and hallucination).
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
    """The toy world's text-to-video "model" G. 01_generate.py runs it by name
    (--pipeline toyworld.generator:ToyGenerator, its fields as --pipeline_kwargs JSON), like a
    diffusers pipeline.

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
