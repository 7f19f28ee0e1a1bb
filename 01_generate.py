r"""01_generate.py: §4, a synthetic video V^s = G(t^s, noise) for every negative caption t^s.

Zanella et al., CVPR 2025 ("Can Text-to-Video Generation help Video-Language Alignment?"), §4:
for each real training triplet (V^r, t^r = caption, t^s = neg_caption), a text-to-video generator
G renders V^s, the video that Eq. (3) pairs with t^s (a match) and t^r (a mismatch). The authors
never released this stage.

Reads   --input_csv    VideoCon layout: videopath, caption, neg_caption, misalignment (+ split, source)
Writes  <out_dir>/videos/<video name>-<row hash>.mp4   one H.264 video per row (written atomically)
        <out_dir>/generated.csv      the input columns + syn_video (relative to <out_dir>) + seed
        <out_dir>/generate_args.json the settings this run used (flags and the resolved generator settings)

Launch (one GPU; then 8 GPUs, rows sharded over ranks, rank 0 writes the CSV):
    python 01_generate.py --input_csv data/videocon/videocon_llm_entailment.csv --out_dir runs/generate
    torchrun --standalone --nproc_per_node 8 01_generate.py --input_csv data/videocon/videocon_llm_entailment.csv \
        --out_dir runs/generate
On a GPU with less than ~40 GB, add --cpu_offload --vae_tiling (only the running part of G sits
on the GPU, and the VAE decodes in tiles). ~4x cheaper, not the paper's exact videos: --cache taylorseer.
A CPU-sized run (a tiny random CogVideoX): README, "A CPU-sized chain"; the toy world's G: toyworld/README.md.
"""
import hashlib
import inspect
import json
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Literal

import numpy as np
import torch

from common import UserError
from synvita.disk import check_resume, file_hash, keep_split, read_csv, save_json, write_csv
from synvita.runs import example_seed, plural, print0, progress, run_stage, setup_distributed, shard, wait_for_files
from synvita.video_io import write_video
from synvita.video_llm import resolve_model

REQUIRED = ("videopath", "caption", "neg_caption", "misalignment")
TEXTS = ("videopath", "caption", "neg_caption")  # must not be empty
SETTINGS = ("num_inference_steps", "guidance_scale", "height", "width", "num_frames", "fps")
# G: any diffusers text-to-video pipeline, by hub id or local folder. The default is CogVideoX-5b
# at its own settings (720x480, 49 frames, 8 fps). The paper names "CogVideoX" without a size or settings;
# we take 5b, the larger of the two 720x480x49 models, trained in bfloat16 as we run it
# (THUDM/CogVideoX-2b is the cheaper choice: pass --dtype float16, its training precision).
# Wan 2.1 and LTX-Video run through the same code with their own defaults.
# NOTE (deviation): the paper's other two generators, LaVie and VideoCrafter2 (512x320, 32 frames),
# are not in diffusers, so this script cannot run them.
#
# Per-pipeline defaults, keyed by the diffusers class named in the checkpoint's model_index.json.
# Each is overridden by its flag. A pipeline not listed here needs every flag of SETTINGS.
PIPELINE_DEFAULTS = {
    # CogVideoX-5b's model card: 720x480, 49 frames at 8 fps, 50 DDIM steps, guidance 6 (§4 gives no settings)
    "CogVideoXPipeline": dict(num_inference_steps=50, guidance_scale=6.0, height=480, width=720, num_frames=49, fps=8),
    # Wan 2.1 T2V (e.g. Wan-AI/Wan2.1-T2V-1.3B-Diffusers): its model card's 832x480, 81 frames, 16 fps
    "WanPipeline": dict(num_inference_steps=50, guidance_scale=5.0, height=480, width=832, num_frames=81, fps=16),
    # LTX-Video (Lightricks/LTX-Video): 704x480, 161 frames, 24 fps, as in its diffusers example
    "LTXPipeline": dict(num_inference_steps=50, guidance_scale=3.0, height=480, width=704, num_frames=161, fps=24),
}
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


@dataclass
class Args:
    input_csv: str = ""
    """VideoCon-layout CSV: videopath, caption, neg_caption (= t^s, the prompt), misalignment"""
    out_dir: str = "runs/generate"
    """where videos/, generated.csv and generate_args.json go"""
    pipeline: str = "THUDM/CogVideoX-5b"
    """G: a diffusers text-to-video pipeline, hub id or local folder (see PIPELINE_DEFAULTS), or a
    Python class "module:Class" called like one (e.g. toyworld.generator:ToyGenerator, the classroom's)"""
    pipeline_kwargs: str = ""
    """JSON keyword arguments for G: a module:Class generator's constructor (e.g. '{"noise": 0}'), or
    diffusers' from_pretrained (e.g. '{"variant": "fp16"}')"""
    num_inference_steps: int = 0
    """denoising steps; 0 = the pipeline's default (CogVideoX: 50)"""
    guidance_scale: float = 0.0
    """classifier-free guidance; 0 = the pipeline's default (CogVideoX: 6.0); 1 turns guidance off"""
    height: int = 0
    """frame height in pixels; 0 = the pipeline's default (CogVideoX: 480)"""
    width: int = 0
    """frame width in pixels; 0 = the pipeline's default (CogVideoX: 720)"""
    num_frames: int = 0
    """frames of V^s; 0 = the pipeline's default (CogVideoX: 49); 1 + a multiple of the VAE's time stride"""
    fps: int = 0
    """frame rate of the mp4; 0 = the pipeline's default (CogVideoX: 8)"""
    seed: int = 0
    """base of every row's seed example_seed(videopath, neg_caption, base=seed): another value, other videos"""
    split: str = "train"
    """keep only rows of this `split` when the CSV has that column ("" = all rows)"""
    misalignment: list = field(default_factory=list)
    """generate only these misalignment types (e.g. action flip); empty = all. Table 2 needs every real
    triplet: generate all types, then train with 03_train.py --syn_types"""
    limit: int = 0
    """generate only the first N selected rows (0 = all)"""
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    """torch dtype of G: auto = bfloat16 on GPU, float32 on CPU; float16 for CogVideoX-2b"""
    cpu_offload: bool = False
    """GPU only: keep G's parts on the CPU and move each to the GPU when it runs (diffusers model offload)"""
    vae_tiling: bool = False
    """decode the video in overlapping tiles: far less GPU memory at 720x480, a little slower; the
    tiles' seams move pixels, so it is recorded in resume.json"""
    vae_slicing: bool = False
    """decode the videos of one call (--prompts_per_call) one at a time: the VAE's memory of one video"""
    cache: Literal["none", "first_block", "taylorseer", "pab", "fastercache", "magcache"] = "none"
    """reuse G's transformer work between denoising steps (CACHES): none = the paper's exact sampling;
    taylorseer: ~4x less transformer work, the videos move (see the NOTE above CACHES)"""
    cache_kwargs: str = ""
    """JSON settings of --cache's diffusers config over ours (CACHES), e.g. '{"cache_interval": 4}'"""
    compile: bool = False
    """torch.compile G's transformer: faster once compiled (the first video pays); recorded, as the
    compiled kernels may round otherwise"""
    prompts_per_call: int = 1
    """rows rendered by one call of G (a batch); each row keeps its own seed's noise. Not with a
    module:Class G, nor with --cache first_block (its skips would depend on the other rows)"""


# ---- §4: the generator G and its settings ----
def resolve_settings(args):
    """Steps, guidance, size, frames and fps: each flag if given (non-zero), else the default of the
    pipeline class named in the checkpoint's model_index.json (read without loading any weights)."""
    from diffusers import DiffusionPipeline
    # cls: None for a hub id or a folder; a typo, a missing folder or no network stop here, in seconds
    cls = python_class(args.pipeline)
    name = cls.__name__ if cls else DiffusionPipeline.load_config(resolve_model(args.pipeline, "--pipeline"))["_class_name"]
    # a module:Class brings its own defaults; a flag left at 0 takes the default
    defaults = PIPELINE_DEFAULTS.get(name, getattr(cls, "defaults", {}))
    settings = {k: getattr(args, k) or defaults.get(k) for k in SETTINGS}
    missing = [f"--{k}" for k, v in settings.items() if v is None]
    if missing:
        raise UserError(f"{args.pipeline}: no defaults for {name} (known: {sorted(PIPELINE_DEFAULTS)}); "
                        f"pass {' '.join(missing)}")
    if name not in CACHE_PIPELINES.get(args.cache, (name,)):  # e.g. FasterCache on Wan: an IndexError mid-run
        raise UserError(f"--cache {args.cache} runs on {', '.join(CACHE_PIPELINES[args.cache])} only, not {name}")
    return name, settings


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
    # auto: bfloat16 on GPU (CogVideoX-5b's training precision), float32 on CPU
    on_gpu = dist.device.startswith("cuda")
    dtype = (torch.bfloat16 if on_gpu else torch.float32) if args.dtype == "auto" else getattr(torch, args.dtype)
    path = resolve_model(args.pipeline, "--pipeline")  # a hub id with no network: its cached folder
    if DiffusionPipeline.load_config(path)["_class_name"] == "WanPipeline":
        dtype = {"vae": torch.float32, "default": dtype}  # Wan 2.1's model card keeps its VAE in float32
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
    if args.compile:
        pipe.transformer.compile()  # torch.compile, in place: the hooks of a cache stay on the module
    pipe.set_progress_bar_config(disable=True)  # one bar over rows (rank 0), not one per video
    return pipe


@torch.no_grad()
def generate(pipe, prompts, seeds, settings):
    """V^s = G(t^s, noise) for a few rows in one call -> one uint8 array (num_frames, height, width, 3) each.

    Each row's noise is drawn by its own CPU torch.Generator, seeded with the row's seed (one
    generator per prompt: diffusers draws row i's latents with generator i), so a row's video does
    not depend on the GPU it ran on, on which rank got it, nor on the rows batched with it."""
    # G(t^s, noise): t^s is the prompt, the noise is drawn from the row's seed
    noise = [torch.Generator("cpu").manual_seed(seed) for seed in seeds]
    call = dict(prompt=prompts if len(prompts) > 1 else prompts[0], num_inference_steps=settings["num_inference_steps"],
                guidance_scale=settings["guidance_scale"], height=settings["height"], width=settings["width"],
                num_frames=settings["num_frames"], generator=noise if len(noise) > 1 else noise[0], output_type="np")
    if "frame_rate" in inspect.signature(pipe.__call__).parameters:  # LTX-Video conditions on the frame rate
        call["frame_rate"] = settings["fps"]
    videos = pipe(**call).frames  # one (T, H, W, 3) array of floats in [0, 1] per prompt
    expected = (settings["num_frames"], settings["height"], settings["width"], 3)
    if videos[0].shape != expected:  # refused: generate_args.json would record another size
        raise UserError(f"{type(pipe).__name__} returned frames of shape {videos[0].shape}, not {expected}: "
                        f"choose --height/--width/--num_frames that it supports")
    return [(frames * 255).round().clip(0, 255).astype(np.uint8) for frames in videos[:len(prompts)]]  # rounded


# ---- §4: V^s = G(t^s, noise) for each row ----
def render(calls, pipe, settings, out_dir, per_call=1):
    """V^s = G(t^s, noise) for the rows of each call, one call of G each (--prompts_per_call rows),
    written to <out_dir>/<syn_video> (video_io.write_video) where the video is not on disk yet."""
    # one thread encodes the videos of call i (x264 on one core, byte-stable: video_io.X264_PARAMS)
    # while G renders call i + 1; at most one call's videos wait, and a failed write stops the run
    with ThreadPoolExecutor(1) as encoder:
        writing = []
        for batch in progress(calls, total=len(calls), desc=f"rendering t^s ({per_call} a call)"):
            videos = generate(pipe, [r["neg_caption"] for r in batch], [r["seed"] for r in batch], settings)
            for done in writing:
                done.result()  # the previous videos are on disk (or their error is raised here)
            writing = [encoder.submit(write_video, os.path.join(out_dir, row["syn_video"]), frames, fps=settings["fps"])
                       for row, frames in zip(batch, videos) if not on_disk(row, out_dir)]
        for done in writing:
            done.result()


def main(args):
    # ---- §4's input: the triplets (V^r, t^r = caption, t^s = neg_caption), bad rows skipped ----
    dist = setup_distributed()
    check_flags(args)  # before any work: nothing is read, loaded or written for a flag that is wrong
    # a missing column, a non-UTF-8 byte or a header-only file stops the run, naming the file
    every = read_csv(args.input_csv, required=REQUIRED, texts=TEXTS)  # bad rows named by line, counted
    rows = keep_split(every, args.split, args.input_csv)  # `Train`, ` train`: train; the others counted
    todo, lines, counts = select_rows(rows, args)
    counts["other_splits"] = len(every) - len(rows)
    for row in todo:  # the two output columns, both functions of the row's identity only
        row["syn_video"] = os.path.join("videos", video_name(row))  # relative to out_dir, the CSV's folder
        # the seed of the row's noise: the same row gets the same frames whatever the number of
        # GPUs, the order of work or a rerun, and the same frames the same mp4, byte for byte
        row["seed"] = example_seed(row["videopath"], row["neg_caption"], base=args.seed)
    # ---- §4: G's settings, the paper's for CogVideoX unless a flag says otherwise ----
    name, settings = resolve_settings(args)
    counts["truncated"] = truncated_rows(args, name, todo, lines)  # t^s past G's text encoder: named
    print0(f"{plural(len(todo), 'row')} to render with {args.pipeline} ({name}, {settings}); {summary(counts)}")
    # settings-checked resume: the videos on disk were made from this input with these settings
    resume, record = os.path.join(args.out_dir, "resume.json"), resume_record(args, settings)

    # ---- §4: V^s = G(t^s, noise) for this rank's calls of G, skipping those already on disk ----
    # The rows go to G in fixed calls of --prompts_per_call (rows 0-1, 2-3, ... of the whole list), and
    # each rank takes every world_size-th call: a video is rendered beside the same rows (a batch's
    # shape can change a kernel's rounding) whatever the number of GPUs, and names and seeds come from
    # the rows, so a rerun with any number of GPUs finds what an earlier run finished.
    calls = shard(calls_of_g(todo, args.prompts_per_call), dist)
    share = [row for call in calls for row in call]
    mine = [call for call in calls if not all(on_disk(row, args.out_dir) for row in call)]
    left = sum(not on_disk(row, args.out_dir) for call in mine for row in call)
    done = len(share) - left
    print0(f"rank 0: {left} of its {plural(len(share), 'row')} to render" + (f", {done} on disk already" if done else ""))
    if os.path.exists(resume):  # a rerun with other settings stops here, before G loads
        check_resume(resume, record, dist)
    pipe = load_generator(args, dist, settings) if mine else None  # G only when there is something to render
    check_resume(resume, record, dist)  # written once G has loaded: a frame count it refused leaves no record
    if mine:
        start = time.time()
        render(mine, pipe, settings, args.out_dir, args.prompts_per_call)
        seconds = time.time() - start
        print0(f"rank 0: {plural(left, 'video')} in {seconds:.1f} s ({seconds / left:.2f} s per video)")
    if not dist.master:  # the other ranks are done: rank 0 alone writes the outputs
        return

    # ---- rank 0 writes the CSV once every row's video is on disk (runs.wait_for_files) ----
    pending = [row for row in todo if not on_disk(row, args.out_dir)]
    if pending:
        print0(f"waiting for {plural(len(pending), 'video')} from the other ranks")
    # polled (at most every 5 s) with no timeout: not a collective, so ranks may finish far apart
    wait_for_files([os.path.join(args.out_dir, row["syn_video"]) for row in pending], every=5)
    # generated.csv, 02_weight.py's input: the selected rows in file order, the input's columns in
    # its order, then ours (syn_video, seed)
    columns = [c for c in dict.fromkeys([*(rows[0] if rows else REQUIRED), "syn_video", "seed"]) if c is not None]
    write_csv(os.path.join(args.out_dir, "generated.csv"), todo, fieldnames=columns)
    # the counts printed: bad rows skipped, rows of other splits or not selected, t^s truncated (file:line)
    save_json(os.path.join(args.out_dir, "generate_args.json"),
              {**asdict(args), "pipeline_class": name, "resolved": settings, "rows": len(todo), **counts})
    print0(f"wrote {os.path.join(args.out_dir, 'generated.csv')}: {plural(len(todo), 'row')}; {summary(counts)}")


# =================================================================================================
# Plumbing: which rows to render, their file names and whether they are done, "module:Class"
# generators. A first reader may skip it.
# =================================================================================================
def check_flags(args):
    """The flags that argparse cannot check, before any work: a UserError (`error: ...`, exit 2) names each."""
    if not args.input_csv:
        raise UserError("pass --input_csv, a CSV with columns " + ", ".join(REQUIRED))
    if args.limit < 0:
        raise UserError(f"--limit {args.limit}: give a number of rows, or 0 for all")
    try:
        json.loads(args.pipeline_kwargs or "{}")
    except json.JSONDecodeError as e:
        raise UserError(f"--pipeline_kwargs {args.pipeline_kwargs!r}: not JSON ({e})") from None
    if args.prompts_per_call < 1:
        raise UserError(f"--prompts_per_call {args.prompts_per_call}: give 1 or more rows a call")
    if args.prompts_per_call > 1 and args.cache == "first_block":  # its skip test reads the whole batch
        raise UserError("--cache first_block decides from all the rows of a call: use --prompts_per_call 1")
    cache_config(args, args.num_inference_steps or 50, lambda: 0)  # its JSON, keys and values, checked here
    if python_class(args.pipeline) and (args.cache != "none" or args.compile or args.prompts_per_call > 1):
        raise UserError(f"--pipeline {args.pipeline} renders one prompt a call, without a transformer: "
                        f"no --cache, --compile or --prompts_per_call")


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


def resume_record(args, settings):
    """What the videos of out_dir are made of (disk.check_resume): the input, the rows, G and every
    setting that moves a pixel. The cache, compile, tiling and batching options enter only when set,
    so a folder made before them still resumes; --cpu_offload and --vae_slicing move no pixel."""
    record = {"input_csv": file_hash(args.input_csv), "split": args.split, "misalignment": sorted(args.misalignment),
              "seed": args.seed, "pipeline": args.pipeline, "pipeline_kwargs": args.pipeline_kwargs,
              "dtype": args.dtype, **settings}
    if args.cache != "none":  # the cache and all its settings, ours and --cache_kwargs'
        record.update(cache=args.cache, cache_settings=cache_config(args, settings["num_inference_steps"], None)[1])
    # a compiled transformer, tiled decoding and a batch's kernels may each round floats otherwise
    record.update({k: getattr(args, k) for k in ("compile", "vae_tiling") if getattr(args, k)})
    if args.prompts_per_call > 1:
        record["prompts_per_call"] = args.prompts_per_call
    return record


def select_rows(rows, args):
    """The rows to generate, in file order, their lines in the file, and what was left out:
    {skipped: bad rows, not_selected: rows of other --misalignment types or past --limit}.

    rows: disk.read_csv's, which already skipped (named by line, counted) rows with a wrong
    number of fields, an empty videopath / caption / neg_caption, and exact duplicates, and kept
    those of --split (disk.keep_split). Here a row with the same (videopath, neg_caption) as an
    earlier one (same identity = same seed = same video) is skipped too. A --misalignment that
    selects no row is an error."""
    keep, lines, first_line, duplicates = [], [], {}, []  # first_line: (videopath, neg_caption) -> its line
    wanted = {kind.strip().lower() for kind in args.misalignment}  # a type is read without case or spaces
    for line, row in zip(rows.lines, rows):
        if args.misalignment and row["misalignment"].strip().lower() not in wanted:  # "Action " is action
            continue  # not asked for
        if (row["videopath"], row["neg_caption"]) in first_line:
            duplicates.append(line)
            continue
        first_line[row["videopath"], row["neg_caption"]] = line
        keep.append(row)
        lines.append(line)
    if duplicates:
        print0(f"{args.input_csv}: {len(duplicates)} row(s) skipped, same videopath and neg_caption as an earlier "
               f"row: line(s) {', '.join(map(str, duplicates))}")
    # a misspelt --misalignment is named, with the types the file has
    types = sorted({r["misalignment"] for r in rows})
    for kind in sorted(wanted - {r["misalignment"].strip().lower() for r in keep}):
        print0(f"--misalignment {kind!r}: no usable row of this type in {args.input_csv}; its types: {types}")
    if not keep:
        raise UserError(f"{args.input_csv}: no usable row with --split {args.split!r} and --misalignment "
                        f"{args.misalignment}; its types: {types}")
    # --limit comes after the filters: the first N rows of what was asked for
    n = args.limit or len(keep)
    bad = sum(map(len, rows.skipped.values())) + len(duplicates)
    return keep[:n], lines[:n], {"skipped": bad, "not_selected": len(rows) - len(duplicates) - len(keep[:n])}


def truncated_rows(args, name, todo, lines):
    """The rows (file:line) whose t^s is longer than G's text encoder takes: G renders them from the
    prompt's first tokens (diffusers truncates with a warning that names no row), so they are named
    here, in one printed line, and counted. A module:Class G has no tokenizer: none."""
    import diffusers
    from transformers import AutoTokenizer
    if python_class(args.pipeline):  # a stand-in G reads the whole caption
        return []
    path = resolve_model(args.pipeline, "--pipeline")
    if "tokenizer" not in diffusers.DiffusionPipeline.load_config(path) or not hasattr(diffusers, name):
        return []  # no text tokenizer of its own to count with
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


def summary(counts):
    """What was left out or changed, in one clause: the run's summary lines and generate_args.json agree."""
    parts = [f"{plural(counts['skipped'], 'bad row')} skipped"]
    if counts["other_splits"]:
        parts.append(f"{plural(counts['other_splits'], 'row')} of other splits left out (--split)")
    if counts["not_selected"]:
        parts.append(f"{plural(counts['not_selected'], 'row')} not selected (--misalignment, --limit)")
    if counts["truncated"]:
        parts.append(f"{plural(len(counts['truncated']), 'neg_caption')} truncated to G's text encoder")
    return ", ".join(parts)


def video_name(row):
    """<real video's name>-<12 hex digits of the row's identity>.mp4: readable, and unique per
    (videopath, neg_caption), the key that also gives the seed."""
    stem = re.sub(r"[^\w-]+", "_", os.path.splitext(os.path.basename(row["videopath"]))[0])
    # a hash of the row's identity: the same row gets the same name in every run and on every rank
    digest = hashlib.sha256(f"{row['videopath']}\x1f{row['neg_caption']}".encode()).hexdigest()[:12]
    return f"{stem}-{digest}.mp4"


def python_class(spec):
    """The class named by "module:Class", or None when spec is a hub id or a folder.

    Any class whose instances are called like a diffusers text-to-video pipeline (prompt, steps,
    guidance, height, width, num_frames, generator, output_type="np") and return an object with
    `.frames[0]` (T, H, W, 3) in [0, 1] can stand in for G; its class attribute `defaults` gives the
    settings a diffusers pipeline gets from PIPELINE_DEFAULTS."""
    # a folder whose name looks like module:Class stays a folder
    if not PYTHON_CLASS.match(spec) or os.path.exists(spec):
        return None
    import importlib
    module, name = spec.split(":")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:  # a typo in the module or the class
        raise UserError(f"--pipeline {spec}: {e}") from None


def calls_of_g(rows, per_call):
    """The rows in G's calls, per_call at a time, by their place in the whole list: rows 0..p-1, p..2p-1,
    ... (the last call may be shorter). A row's companions in a call do not depend on the GPU count."""
    return [rows[i:i + per_call] for i in range(0, len(rows), per_call)]


def on_disk(row, out_dir):
    """Whether the row's video is done: it exists under its final name. video_io.write_video writes a
    *.tmp<pid>.mp4 and renames it last, so a killed run's partial file never counts as done."""
    return os.path.exists(os.path.join(out_dir, row["syn_video"]))


if __name__ == "__main__":
    run_stage(main, Args)  # a user's mistake: `error: ...`, exit 2
