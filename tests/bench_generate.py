"""Benchmark of 01_generate.py's --cache settings on tiny random CogVideoX, Wan 2.1 and LTX-Video
pipelines (tests/tiny_generate.py, 4 transformer blocks each), built offline, on the CPU.

For each pipeline and cache setting (01's own CACHES, through 01's cache_config), one video of 50
steps at the pipeline's default guidance, and:
  calls      transformer forward calls per video (a forward hook; Wan calls cond and uncond apart)
  passes     transformer work per video in full passes: the multiply-adds of the linear layers inside
             the blocks that really ran, over those of one uncached call (a skipped layer runs none)
  fewer      passes without cache / passes with it: the "x fewer transformer calls" of a cache
  speedup    no cache's wall time per video over this one's, the median of interleaved repeats
  |dframe|   mean |difference| per pixel (0-255) from the uncached video of the same seed
What a tiny random model cannot tell: quality. Its features do not evolve as a trained model's do,
so the skips of first_block and magcache (which read the features) and every |dframe| say nothing
about a real G; the skip schedules of taylorseer, pab and fastercache depend on the step alone, so
their passes are those of a real-size G. Its wall time is mostly the VAE, the text encoder and
Python, not the transformer: real-size speedups are nearer the passes ratio. LaVie and VideoCrafter2
are UNets, to which none of these caches apply (01 refuses --cache with them): they are not measured.

    python tests/bench_generate.py [--repeats 3]
"""
import argparse
import contextlib
import importlib
import io
import os
import re
import statistics
import sys
import tempfile
import time

import numpy as np
import torch

sys.path[:0] = [os.path.dirname(os.path.dirname(os.path.abspath(__file__))), os.path.dirname(os.path.abspath(__file__))]
tiny_generate = importlib.import_module("tiny_generate")  # through the path above

gen = importlib.import_module("01_generate")
generator = importlib.import_module("synvita.generator")  # G's caches: CACHES, cache_config
BLOCK = re.compile(r"^(transformer_blocks|blocks)\.\d+\.")  # a layer inside a transformer block
# (tiny builder, frame size: 9 frames, the VAEs' smallest sizes that decode)
PIPELINES = {"CogVideoXPipeline": (tiny_generate.tiny_cogvideox, dict(height=32, width=64)),
             "WanPipeline": (tiny_generate.tiny_wan, dict(height=32, width=32)),
             "LTXPipeline": (tiny_generate.tiny_ltx, dict(height=64, width=64))}
# the settings measured: (label, --cache, --cache_kwargs)
SETTINGS = [("none", "none", ""), ("first_block", "first_block", ""), ("taylorseer", "taylorseer", ""),
            ("taylorseer lite", "taylorseer", '{"use_lite_mode": true}'), ("pab", "pab", ""),
            ("fastercache", "fastercache", ""), ("magcache", "magcache", None)]  # None: calibrated here


class Counter:
    """Forward hooks: transformer calls, and the multiply-adds of the block layers that ran."""

    def __init__(self, transformer):
        self.calls, self.macs = 0, 0
        self.hooks = [transformer.register_forward_hook(self.call)]
        self.hooks += [m.register_forward_hook(self.linear) for name, m in transformer.named_modules()
                       if isinstance(m, torch.nn.Linear) and BLOCK.match(name)]

    def call(self, *_):
        self.calls += 1

    def linear(self, module, _, out):
        self.macs += out.numel() * module.in_features  # (tokens x out) outputs, in_features each

    def remove(self):
        for hook in self.hooks:
            hook.remove()


def render(pipe, settings, seed=0):
    """One video, as 01 renders it -> (uint8 frames, transformer calls, block multiply-adds, seconds)."""
    counter = Counter(pipe.transformer)
    start = time.perf_counter()
    frames = gen.generate(pipe, ["A dog runs to the left of a red ball."], [seed], settings)[0]
    seconds = time.perf_counter() - start
    counter.remove()
    return frames, counter.calls, counter.macs, seconds


def calibrate(pipe, settings):
    """MagCache's mag_ratios of this checkpoint: one calibration run (diffusers prints them)."""
    from diffusers import MagCacheConfig
    pipe.transformer.enable_cache(MagCacheConfig(calibrate=True, num_inference_steps=settings["num_inference_steps"]))
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        render(pipe, settings)
    pipe.transformer.disable_cache()
    return re.search(r"\[1\.0, [^\]]*\]", printed.getvalue()).group(0)  # the first context's ratios


def bench(name, path, size, repeats):
    """The rows of one pipeline: every setting once per repeat, interleaved, so drift hits all alike."""
    from diffusers import DiffusionPipeline
    pipe = DiffusionPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    settings = dict(gen.PIPELINE_DEFAULTS[name], num_frames=9, **size)  # 50 steps, the default guidance
    configs = {}
    for label, cache, kwargs in SETTINGS:
        if name not in generator.CACHE_PIPELINES.get(cache, (name,)):
            continue  # refused by 01 (fastercache: CogVideoX only)
        args = gen.Args(cache=cache, cache_kwargs=f'{{"mag_ratios": {calibrate(pipe, settings)}}}' if kwargs is None else kwargs)
        configs[label] = args
    results = {label: [] for label in configs}
    for _ in range(repeats):
        for label, args in configs.items():
            config, _ = generator.cache_config(args, settings["num_inference_steps"], lambda: pipe.current_timestep)
            if config:
                pipe.transformer.enable_cache(config)
            results[label].append(render(pipe, settings))
            if config:
                pipe.transformer.disable_cache()
    base_frames, base_calls, base_macs, _ = results["none"][0]
    rows = []
    for label, runs in results.items():
        frames, calls, macs, _ = runs[0]
        assert all(np.array_equal(r[0], frames) for r in runs), f"{name} {label}: not reproducible"
        passes = macs / (base_macs / base_calls)  # in uncached calls' worth of block work
        ratio = statistics.median(b[3] / r[3] for r, b in zip(runs, results["none"]))  # paired by repeat
        delta = np.abs(frames.astype(float) - base_frames.astype(float)).mean()
        rows.append((name, label, calls, passes, base_calls / passes, ratio, delta))
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats per setting")
    args = parser.parse_args()
    torch.set_num_threads(1)  # one core: the machine is shared, and ratios are steadier
    from diffusers.utils import logging
    logging.set_verbosity_error()  # FasterCache's "experimental", TaylorSeer lite's "overrides" warnings
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, (build, size) in PIPELINES.items():
            rows += bench(name, build(os.path.join(tmp, name), num_layers=4), size, args.repeats)
    print(f"{'pipeline':18} {'cache':16} {'calls':>5} {'passes':>6} {'fewer':>6} {'speedup':>7} {'|dframe|':>8}")
    for name, label, calls, passes, fewer, ratio, delta in rows:
        print(f"{name:18} {label:16} {calls:5d} {passes:6.1f} {fewer:5.2f}x {ratio:6.2f}x {delta:8.2f}")
    print("passes: block work per video in uncached calls; fewer: none's passes / these; speedup: none's wall"
          " time / this one's (median of interleaved repeats); |dframe|: mean |difference| per pixel (0-255) from none")


if __name__ == "__main__":
    main()
