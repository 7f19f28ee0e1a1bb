"""The text-to-video generator G of §4 (01_generate.py): its settings resolved (a flag, else the
pipeline's default), G loaded as a diffusers pipeline with the memory savers or as a "module:Class"
Python generator, the caches of --cache and their diffusers config, and the captions t^s longer than
G's text encoder reads."""
import inspect
import json
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
    # the VAE keeps frame 0, then 1 latent per `stride` frames (LTX-Video: vae_temporal_compression_ratio)
    stride = getattr(pipe, "vae_scale_factor_temporal", None) or getattr(pipe, "vae_temporal_compression_ratio", 1)
    if (settings["num_frames"] - 1) % stride:
        raise UserError(f"--num_frames {settings['num_frames']}: {type(pipe).__name__} renders 1 + a multiple of "
                        f"{stride} frames, e.g. {(settings['num_frames'] - 1) // stride * stride + 1}")
    if args.cpu_offload:  # only the running part of G sits on the GPU
        pipe.enable_model_cpu_offload(gpu_id=dist.local_rank)
    else:
        pipe.to(dist.device)
    if args.vae_tiling:
        pipe.vae.enable_tiling()
    if args.vae_slicing:  # a batch of videos decoded one by one
        pipe.vae.enable_slicing()
    config, _ = cache_config(args, settings["num_inference_steps"], lambda: pipe.current_timestep)
    if config:  # diffusers resets the cache's state at the end of each call: no row sees another's
        pipe.transformer.enable_cache(config)
    if args.compile:  # torch.compile, in place: the hooks of a cache stay on the module
        (pipe.unet if release else pipe.transformer).compile()
    pipe.set_progress_bar_config(disable=True)  # one bar over rows (rank 0), not one per video
    return pipe


def cache_config(args, steps, timestep):
    """--cache and --cache_kwargs -> (the diffusers config that pipe.transformer.enable_cache takes, or
    None for none; its settings as resume.json records them). steps: num_inference_steps (MagCache
    spreads its ratios over them); timestep: the pipeline's current t (PAB and FasterCache read it)."""
    import dataclasses
    import diffusers
    if args.cache == "none":
        return None, {}
    class_name, ours = CACHES[args.cache]
    cls = getattr(diffusers, class_name)
    try:
        given = json.loads(args.cache_kwargs or "{}")
    except json.JSONDecodeError as e:
        raise UserError(f"--cache_kwargs {args.cache_kwargs!r}: not JSON ({e})") from None
    fields = {f.name: f.default for f in dataclasses.fields(cls)}
    unknown = sorted(set(given) - set(fields) | set(given) & SET_HERE) if isinstance(given, dict) else None
    if unknown or unknown is None:  # a misspelt key would be silently ignored by nothing: refused
        raise UserError(f"--cache_kwargs {args.cache_kwargs!r}: {class_name} takes a JSON object of "
                        f"{sorted(set(fields) - SET_HERE)}" + (f", not {unknown}" if unknown else ""))
    settings = {**ours, **given}  # recorded as given: JSON lists and dtype names
    try:
        kwargs = {k: tuple(v) if isinstance(fields[k], tuple) and isinstance(v, list)  # (low, high) ranges
                  else getattr(torch, v) if isinstance(fields[k], torch.dtype) else v for k, v in settings.items()}
        kwargs.update({k: v for k, v in dict(current_timestep_callback=timestep, num_inference_steps=steps).items()
                       if k in fields})
        return cls(**kwargs), settings
    except (TypeError, ValueError, AttributeError) as e:  # e.g. MagCache without mag_ratios: its first line
        raise UserError(f"--cache {args.cache} --cache_kwargs {args.cache_kwargs!r}: {str(e).strip().splitlines()[0]}") from None


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
