"""The text-to-video generator G of §4 (01_generate.py): its settings resolved (a flag, else the
pipeline's default), G loaded as a diffusers pipeline with the memory savers or as a "module:Class"
Python generator, the caches of --cache and their diffusers config, and the captions t^s longer than
G's text encoder reads."""
import inspect
import json
import math
import os
import re

import torch

from synvita.runs import UserError, print0
from synvita.video_llm import resolve_model

# the flags of G's settings; a flag left at 0 takes the pipeline's default
SETTINGS = ("num_inference_steps", "guidance_scale", "height", "width", "num_frames", "fps")
# --pipeline may instead name a Python class, "module:Class", that stands in for G (python_class),
# e.g. the classroom's toy generator:
#     --pipeline toyworld.generator:ToyGenerator --pipeline_kwargs '{"noise": 0}'
PYTHON_CLASS = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")

# ---- caches: G's transformer work reused between denoising steps (diffusers' enable_cache) ----
# NOTE (deviation): the default --cache none is the paper's sampling: G's transformer runs in full
# at each of the 50 steps, so V^s is exactly G(t^s, noise). A cache reuses or extrapolates the
# outputs of earlier steps instead, so V^s moves: 2-4x less transformer work per video, at a quality
# that only a real-size G can tell (README, "Reproduce the paper": the cost model; tests/bench_generate.py). A cached video
# is still a function of its row alone: every cache below decides what to skip from the step index
# (first_block: from the call's own features, hence one prompt per call), never from time or order.
# The attention (attn1, attn2) and feed-forward (ff; Wan: ffn) layers of every block of CogVideoX,
# Wan and LTX-Video: TaylorSeer's own default pattern ("...attn") matches none of them.
BLOCK_LAYERS = r"(transformer_blocks|blocks)\.\d+\.(attn\d|ff|ffn)"
# --cache name -> (diffusers config class, our settings; --cache_kwargs overrides any of them)
CACHES = {
    # skip blocks 2..L when block 1's residual moved < threshold since the last full step (~TeaCache)
    "first_block": ("FirstBlockCacheConfig", dict(threshold=0.05)),
    # TaylorSeer (ICCV 2025): every layer's output forecast by a 1st-order Taylor series from its last
    # full steps; full at steps 0-2, then 1 in cache_interval (N=5, order O=1): 13 of 50 steps. Its
    # factors hold 2 copies of each layer's output (bfloat16; CogVideoX-5b at 720x480x49: ~37 GB more);
    # '{"use_lite_mode": true}' forecasts G's output alone instead, in next to no memory
    "taylorseer": ("TaylorSeerCacheConfig", dict(cache_interval=5, disable_cache_before_step=3, max_order=1,
                                                 cache_identifiers=[BLOCK_LAYERS])),
    # Pyramid Attention Broadcast: self-attention reused every other step while 100 < t < 800 (diffusers' example)
    "pab": ("PyramidAttentionBroadcastConfig", dict(spatial_attention_block_skip_range=2,
                                                    spatial_attention_timestep_skip_range=[100, 800])),
    # FasterCache: attention reused every other step, the unconditional half of CFG every 5th (diffusers'
    # CogVideoX example); it needs CFG's two halves in one batch of frames: CogVideoX only
    "fastercache": ("FasterCacheConfig", dict(spatial_attention_block_skip_range=2, spatial_attention_timestep_skip_range=[-1, 681],
                                              low_frequency_weight_update_timestep_range=[99, 641], tensor_format="BFCHW",
                                              spatial_attention_block_identifiers=["transformer_blocks"])),
    # MagCache: all blocks skipped while the calibrated residual-magnitude ratios say little changes;
    # needs the checkpoint's ratios: '{"mag_ratios": [...]}' (a '{"calibrate": true}' run prints them)
    "magcache": ("MagCacheConfig", dict(threshold=0.06, max_skip_steps=3, retention_ratio=0.2)),
}
CACHE_PIPELINES = {"fastercache": ("CogVideoXPipeline",)}  # where a cache is known to run (others: all three)
SET_HERE = {"current_timestep_callback", "attention_weight_callback", "low_frequency_weight_callback",
            "high_frequency_weight_callback", "num_inference_steps"}  # from the pipeline and --num_inference_steps


# ---- §4: the generator G and its settings ----
def load_generator(args, dist, settings):
    """G as a diffusers pipeline on this rank's device, with the chosen memory savers (or an instance
    of a module:Class generator, built from --pipeline_kwargs)."""
    from diffusers import DiffusionPipeline
    kwargs = json.loads(args.pipeline_kwargs or "{}")  # valid JSON: check_flags
    if cls := python_class(args.pipeline):  # a stand-in G: no weights, device or memory savers
        try:
            return cls(**kwargs)
        except TypeError as e:  # a keyword the class does not take
            raise UserError(f"--pipeline_kwargs {args.pipeline_kwargs}: {args.pipeline}: {e}") from None
    path = resolve_model(args.pipeline, "--pipeline")  # a hub id with no network: its cached folder
    release = original_release(path)
    # auto: on GPU the precision G was run in (CogVideoX-5b: bfloat16; LaVie: float16; VideoCrafter2:
    # float32, RELEASE_DTYPE), float32 on CPU
    on_gpu = dist.device.startswith("cuda")
    auto = RELEASE_DTYPE.get(release.__name__, torch.bfloat16) if release else torch.bfloat16
    dtype = (auto if on_gpu else torch.float32) if args.dtype == "auto" else getattr(torch, args.dtype)
    if release:  # LaVie or VideoCrafter2 from their own release files, converted as they load
        try:
            pipe = release.from_pretrained(path, torch_dtype=dtype, **kwargs)
        except TypeError as e:  # a keyword it does not take
            raise UserError(f"--pipeline_kwargs {args.pipeline_kwargs}: {release.__name__}: {e}") from None
    elif DiffusionPipeline.load_config(path)["_class_name"] == "WanPipeline":
        # Wan 2.1's model card keeps its VAE in float32
        pipe = DiffusionPipeline.from_pretrained(path, dtype={"vae": torch.float32, "default": dtype}, **kwargs)
    else:
        pipe = DiffusionPipeline.from_pretrained(path, dtype=dtype, **kwargs)
    check_size(pipe, release, settings)  # before any record or video is written: a size G cannot render
    if args.cpu_offload:  # only the running part of G sits on the GPU
        pipe.enable_model_cpu_offload(gpu_id=dist.local_rank)
    else:
        pipe.to(dist.device)
    if args.vae_tiling:
        pipe.vae.enable_tiling()
    # each video (LaVie: each frame) decoded alone, whatever --prompts_per_call: a batched decode rounds
    # by its batch and, on the CPU, by the thread count (torchrun's workers get OMP_NUM_THREADS=1, a
    # plain `python` every core), so V^s would depend on the rows beside it and on the launcher
    pipe.vae.enable_slicing()
    config, _ = cache_config(args, settings["num_inference_steps"], lambda: pipe.current_timestep)
    if config:  # diffusers resets the cache's state at the end of each call: no row sees another's
        pipe.transformer.enable_cache(config)
    if args.compile:  # torch.compile, in place: the hooks of a cache stay on the module
        (pipe.unet if release else pipe.transformer).compile()
    pipe.set_progress_bar_config(disable=True)  # one bar over rows (rank 0), not one per video
    return pipe


def check_size(pipe, release, settings):
    """A frame count, height or width that G cannot render: a UserError as G loads, before any
    record or video is written (diffusers checks them only in G's first call, or not at all)."""
    name = type(pipe).__name__
    # the VAE keeps frame 0, then 1 latent per `stride` frames (LTX-Video: vae_temporal_compression_ratio)
    stride = getattr(pipe, "vae_scale_factor_temporal", None) or getattr(pipe, "vae_temporal_compression_ratio", 1)
    if (settings["num_frames"] - 1) % stride:
        raise UserError(f"--num_frames {settings['num_frames']}: {name} renders 1 + a multiple of "
                        f"{stride} frames, e.g. {(settings['num_frames'] - 1) // stride * stride + 1}")
    multiple = spatial_multiple(pipe, release)
    height, width = settings["height"], settings["width"]
    if height % multiple or width % multiple:
        raise UserError(f"--height {height} --width {width}: {name} renders heights and widths that are "
                        f"multiples of {multiple}, e.g. {max(multiple, height // multiple * multiple)}x"
                        f"{max(multiple, width // multiple * multiple)}")


def spatial_multiple(pipe, release):
    """The multiple of pixels G's height and width must be: LaVie's own check (8, pipeline_videogen);
    VideoCrafter2's (the VAE's factor, halved by each UNet level but the last); a diffusers pipeline's
    VAE factor times its transformer's patch (CogVideoX 8 x 2: diffusers checks 8, and 40 fails in the
    transformer; Wan 8 x 2; LTX-Video 32 x 1)."""
    from synvita import lavie, videocrafter2
    if release is lavie.LaViePipeline:
        return 8
    if release is videocrafter2.VideoCrafter2Pipeline:
        return pipe.vae_scale_factor * 2 ** (len(pipe.unet.config.block_out_channels) - 1)
    vae = getattr(pipe, "vae_scale_factor_spatial", None) or getattr(pipe, "vae_spatial_compression_ratio", None) or 1
    patch = getattr(getattr(pipe, "transformer", None), "config", {}).get("patch_size") or 1
    return vae * (patch[-1] if isinstance(patch, (list, tuple)) else patch)  # Wan: (t, h, w)


def cache_config(args, steps, timestep):
    """--cache and --cache_kwargs -> (the diffusers config that pipe.transformer.enable_cache takes, or
    None for none; its settings as resume.json records them). steps: num_inference_steps (MagCache
    spreads its ratios over them); timestep: the pipeline's current t (PAB and FasterCache read it).
    Every key and value is checked here, before any work (check_cache_value): diffusers checks few
    of them, and those only mid-run (a cache_interval of 0 divides by zero at the first step)."""
    import dataclasses
    import typing
    import diffusers
    if args.cache == "none":
        return None, {}
    class_name, ours = CACHES[args.cache]
    cls = getattr(diffusers, class_name)
    try:
        given = json.loads(args.cache_kwargs or "{}")
    except json.JSONDecodeError as e:
        raise UserError(f"--cache_kwargs {args.cache_kwargs!r}: not JSON ({e})") from None
    hints = typing.get_type_hints(cls)  # each field's annotation: what its value must be
    offered = sorted(f.name for f in dataclasses.fields(cls) if f.name not in SET_HERE and not f.name.startswith("_"))
    unknown = sorted(set(given) - set(offered)) if isinstance(given, dict) else None
    if unknown or unknown is None:  # a misspelt key would be silently ignored by nothing: refused
        raise UserError(f"--cache_kwargs {args.cache_kwargs!r}: {class_name} takes a JSON object of "
                        f"{offered}" + (f", not {unknown}" if unknown else ""))
    settings = {**ours, **given}  # recorded as given: JSON lists and dtype names
    for key, value in settings.items():
        check_cache_value(f"--cache_kwargs {args.cache_kwargs!r}: {class_name}'s {key}", key, value, hints[key])
    kwargs = {k: config_value(v, hints[k]) for k, v in settings.items()}  # JSON lists as tuples, dtypes by name
    kwargs.update({k: v for k, v in dict(current_timestep_callback=timestep, num_inference_steps=steps).items()
                   if k in hints})
    try:
        return cls(**kwargs), settings
    except (TypeError, ValueError, AttributeError) as e:  # e.g. MagCache without mag_ratios: its first line
        raise UserError(f"--cache {args.cache} --cache_kwargs {args.cache_kwargs!r}: {str(e).strip().splitlines()[0]}") from None


# a setting that runs something once every N steps or calls (diffusers takes the step modulo N): N >= 1
EVERY_NTH = re.compile(r"(cache_interval|block_skip_range|batch_skip_range)$")
CHOICES = {"tensor_format": ("BCFHW", "BFCHW", "BCHW")}  # FasterCache's, checked by diffusers once G has loaded


def check_cache_value(where, key, value, hint):
    """A --cache_kwargs value (as JSON gives it) against its config field's annotation `hint`: a
    UserError "`where` takes ..., not ..." when it is not what the field takes, or is out of the range
    that diffusers would find out about only mid-run (a step modulo 0, a negative count)."""
    import types
    import typing
    arms = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) in (typing.Union, types.UnionType):  # e.g. int | None, Tensor | list[float] | None
        if value is None and len(arms) < len(typing.get_args(hint)):
            return
        # JSON never gives a tensor: MagCache's ratios are its list arm
        return check_cache_value(where, key, value, next(a for a in arms if a is not torch.Tensor))
    origin = typing.get_origin(hint) or hint
    low = 1 if EVERY_NTH.search(key) else 0
    if hint is bool:
        fits, wanted = isinstance(value, bool), "true or false"
    elif hint is int:
        fits, wanted = is_number(value) and isinstance(value, int) and value >= low, f"an integer >= {low}"
    elif hint is float:
        fits, wanted = is_number(value) and value >= 0, "a number >= 0"
    elif hint is str:
        choices = CHOICES.get(key)
        fits = isinstance(value, str) and (choices is None or value in choices)
        wanted = f"one of {list(choices)}" if choices else "a string"
    elif hint is torch.dtype:
        fits, wanted = isinstance(value, str) and isinstance(getattr(torch, value, None), torch.dtype), \
            'a torch dtype\'s name, e.g. "float32"'
    elif origin in (tuple, list) and arms and arms[0] is str:  # module-name patterns: regular expressions
        fits = isinstance(value, list) and all(isinstance(p, str) and compiles(p) for p in value)
        wanted = "a list of regular expressions"
    elif origin is tuple:  # a timestep range (low, high); FasterCache's start at -1
        fits = isinstance(value, list) and len(value) == 2 and all(map(is_number, value)) and value[0] <= value[1]
        wanted = "[low, high]: two numbers, low <= high"
    elif origin is list:  # MagCache's calibrated ratios, one per step (spread over the steps)
        fits = isinstance(value, list) and len(value) > 0 and all(is_number(v) and v > 0 for v in value)
        wanted = "a list of numbers > 0"
    else:  # a callback: 01 sets those (SET_HERE), JSON cannot give one
        fits, wanted = True, ""
    if not fits:
        raise UserError(f"{where} takes {wanted}, not {json.dumps(value)}")


def is_number(value):
    """A finite JSON number (not true/false, which Python counts as ints; not NaN, which json reads)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def config_value(value, hint):
    """A checked JSON value as the config field wants it: a (low, high) list as a tuple, a dtype's name
    as the torch dtype."""
    import typing
    arms = [hint, *typing.get_args(hint)]
    if isinstance(value, list) and any(typing.get_origin(a) is tuple for a in arms):
        return tuple(value)
    return getattr(torch, value) if isinstance(value, str) and torch.dtype in arms else value


def compiles(pattern):
    """Whether `pattern` is a regular expression (diffusers matches module names with it)."""
    try:
        re.compile(pattern)
        return True
    except re.error:
        return False


# ---- G's text encoder: the t^s it reads only in part ----
def truncated_rows(args, name, todo, lines):
    """The rows (file:line) whose t^s is longer than G's text encoder takes: G renders them from the
    prompt's first tokens (diffusers truncates with a warning that names no row), so they are named
    here, in one printed line, and counted. A module:Class G has no tokenizer: none."""
    import diffusers
    from transformers import AutoTokenizer
    if python_class(args.pipeline):  # a stand-in G reads the whole caption
        return []
    path = resolve_model(args.pipeline, "--pipeline")
    if release := original_release(path):  # LaVie's and VideoCrafter2's CLIP tokenizers: 77 tokens, BOS and EOS
        from transformers import CLIPTokenizer  # the release's files: vocab.json and merges.txt
        tokenizer, limit = CLIPTokenizer.from_pretrained(release_tokenizer(release, path)), 77
    elif "tokenizer" not in diffusers.DiffusionPipeline.load_config(path) or not hasattr(diffusers, name):
        return []  # no text tokenizer of its own to count with
    else:
        tokenizer = AutoTokenizer.from_pretrained(path, subfolder="tokenizer")  # the tokenizer alone, no weights
        # the most tokens G encodes: its pipeline's max_sequence_length (CogVideoX: 226), else its tokenizer's
        default = inspect.signature(getattr(diffusers, name).__call__).parameters.get("max_sequence_length")
        limit = default.default if default and isinstance(default.default, int) else tokenizer.model_max_length
    # truncated, not skipped: the paper's G (diffusers' CogVideoX) renders the first tokens too; the
    # count is of the tokens as G's tokenizer makes them, its end token included
    long = [f"{args.input_csv}:{line}" for row, line in zip(todo, lines)
            if len(tokenizer(row["neg_caption"])["input_ids"]) > limit]
    if long:
        print0(f"{args.input_csv}: {len(long)} neg_caption(s) longer than the {limit} tokens {name}'s text encoder "
               f"takes, rendered from their first {limit} tokens: line(s) "
               + ", ".join(x.rsplit(":", 1)[1] for x in long))
    return long


# ---- the paper's other two generators, read from their original releases (no model_index.json) ----
# their precision on a GPU with --dtype auto: LaVie's sampling script runs float16, VideoCrafter2's float32
RELEASE_DTYPE = {"LaViePipeline": torch.float16, "VideoCrafter2Pipeline": torch.float32}


def original_release(path):
    """LaViePipeline or VideoCrafter2Pipeline for a folder laid out as that model's release
    (synvita/lavie.py, synvita/videocrafter2.py say how to fill it), else None (a diffusers folder)."""
    if not os.path.isdir(path):
        return None
    from synvita import lavie, videocrafter2
    if lavie.is_lavie_folder(path):
        return lavie.LaViePipeline
    return videocrafter2.VideoCrafter2Pipeline if videocrafter2.is_videocrafter2_folder(path) else None


def release_tokenizer(release, path):
    """The folder of a release's CLIP tokenizer (LaVie: SD-1.4's; VideoCrafter2: tokenizer/)."""
    from synvita import lavie
    return lavie.tokenizer_folder(path) if release is lavie.LaViePipeline else os.path.join(path, "tokenizer")


# ---- "module:Class" generators ----
def python_class(spec):
    """The class named by "module:Class", or None when spec is a hub id or a folder.

    Any class whose instances are called like a diffusers text-to-video pipeline (prompt, steps,
    guidance, height, width, num_frames, generator, output_type="np") and return an object with
    `.frames[0]` (T, H, W, 3) in [0, 1] can stand in for G; its class attribute `defaults` gives the
    settings a diffusers pipeline gets from 01_generate.py's PIPELINE_DEFAULTS."""
    # a folder whose name looks like module:Class stays a folder
    if not PYTHON_CLASS.match(spec) or os.path.exists(spec):
        return None
    import importlib
    module, name = spec.split(":")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:  # a typo in the module or the class
        raise UserError(f"--pipeline {spec}: {e}") from None
