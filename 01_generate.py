r"""01_generate.py: §4, a synthetic video V^s = G(t^s, noise) for every negative caption t^s.

Zanella et al., CVPR 2025 ("Can Text-to-Video Generation help Video-Language Alignment?"), §4:
for each real training triplet (V^r, t^r = caption, t^s = neg_caption), a text-to-video generator
G renders V^s, the video that Eq. (3) pairs with t^s (a match) and t^r (a mismatch). The authors
never released this stage.

Reads   --input_csv    VideoCon layout: videopath, caption, neg_caption, misalignment (+ split, source)
Writes  <out_dir>/videos/<video name>-<row hash>.mp4   one H.264 video per row (written atomically)
        <out_dir>/generated.csv      the input columns + syn_video (relative to <out_dir>) + seed
        <out_dir>/generated_skipped.csv  each bad row left out once: file, line, videopath, reason
        <out_dir>/generate_args.json the settings this run used (flags and the resolved generator settings)

Launch (one GPU; then 8 GPUs, rows sharded over ranks, rank 0 writes the CSV):
    python 01_generate.py --input_csv data/videocon/videocon_llm_entailment.csv --out_dir runs/generate
    torchrun --standalone --nproc_per_node 8 01_generate.py --input_csv data/videocon/videocon_llm_entailment.csv \
        --out_dir runs/generate
Preemptible single-GPU jobs: --shard i/n each, then the same flags without --shard (README, "On a cluster").
GPUs under ~40 GB: --cpu_offload --vae_tiling. ~4x cheaper, not the paper's exact videos: --cache taylorseer.
A CPU-sized run (a tiny random CogVideoX): README, "A CPU-sized chain"; the toy world's G: toyworld/README.md.
"""
import inspect
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Literal

import numpy as np
import torch

from synvita import disk, generator, render_rows, render_writer, runs, video_llm

# G: the paper's three generators. CogVideoX (the default) is any diffusers text-to-video pipeline, by
# hub id or local folder, at its own settings (720x480, 49 frames, 8 fps): the paper names "CogVideoX"
# without a size or settings; we take 5b, the larger of the two 720x480x49 models, trained in bfloat16 as
# we run it (THUDM/CogVideoX-2b is the cheaper choice: --dtype float16, its training precision). LaVie and
# VideoCrafter2 are in no diffusers release: rebuilt on its parts (synvita/lavie.py, synvita/videocrafter2.py),
# they read a folder laid out as their original release, with their original samplers. Wan 2.1 and
# LTX-Video run through the same code as CogVideoX, with their own defaults.
#
# Per-pipeline defaults, keyed by the class G is (a diffusers checkpoint's model_index.json names it).
# Each is overridden by its flag. A pipeline not listed here needs every flag of generator.SETTINGS.
PIPELINE_DEFAULTS = {
    # CogVideoX-5b's model card: 720x480, 49 frames at 8 fps, 50 DDIM steps, guidance 6 (§4 gives no settings)
    "CogVideoXPipeline": dict(num_inference_steps=50, guidance_scale=6.0, height=480, width=720, num_frames=49, fps=8),
    # Wan 2.1 T2V (e.g. Wan-AI/Wan2.1-T2V-1.3B-Diffusers): its model card's 832x480, 81 frames, 16 fps
    "WanPipeline": dict(num_inference_steps=50, guidance_scale=5.0, height=480, width=832, num_frames=81, fps=16),
    # LTX-Video (Lightricks/LTX-Video): 704x480, 161 frames, 24 fps, as in its diffusers example
    "LTXPipeline": dict(num_inference_steps=50, guidance_scale=3.0, height=480, width=704, num_frames=161, fps=24),
    # LaVie's sampling settings (DDPM 50 steps, guidance 7.5, 320x512, 8 fps) at the paper's clips' 32 frames
    # NOTE (deviation): 32 frames, not LaVie's own 16: the paper's clips on its project page (SPEC)
    "LaViePipeline": dict(num_inference_steps=50, guidance_scale=7.5, height=320, width=512, num_frames=32, fps=8),
    # VideoCrafter2's run script (DDIM 50 steps, eta 1, guidance 12, fps condition 28), 320x512, and the paper's
    # clips' 32 frames at 8 fps. NOTE (deviation): not the model's own 16 frames and 10 fps mp4 (as above)
    "VideoCrafter2Pipeline": dict(num_inference_steps=50, guidance_scale=12.0, height=320, width=512, num_frames=32, fps=8),
}


# The flags (runs.parse_args: each field's docstring is its --help). CACHES, and the NOTE above it
# that --cache's help names, are in synvita/generator.py.
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
    shard: str = ""
    """i/n: render only G's calls i, i + n, ... in this one process, no torchrun (e.g. a job array's
    $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT), resumable alone; then the same flags without
    --shard render what is missing and write generated.csv ("" = every row)"""
    dist_timeout: int = runs.DIST_TIMEOUT
    """under torchrun: seconds without progress from another rank (its videos) before rank 0 stops,
    naming what is missing (a lost node), and torch.distributed's timeout; more than one call of G"""
    # checked before any work (runs.check_numbers): every number above finite and >= 0 (0 as its
    # --help says), and these above 0
    POSITIVE = ("prompts_per_call", "dist_timeout")


# ---- §4: G's settings, the paper's for CogVideoX unless a flag says otherwise ----
def resolve_settings(args):
    """Steps, guidance, size, frames and fps: each flag if given (non-zero), else the default of the
    pipeline class named in the checkpoint's model_index.json (read without loading any weights)."""
    from diffusers import DiffusionPipeline
    # cls: None for a hub id or a folder; a typo, a missing folder or no network stop here, in seconds
    cls = generator.python_class(args.pipeline)
    path = None if cls else video_llm.resolve_model(args.pipeline, "--pipeline")
    release = generator.original_release(path) if path else None  # LaVie's or VideoCrafter2's release folder
    name = (cls or release).__name__ if cls or release else DiffusionPipeline.load_config(path)["_class_name"]
    # a module:Class brings its own defaults; a flag left at 0 takes the default
    defaults = PIPELINE_DEFAULTS.get(name, getattr(cls, "defaults", {}))
    settings = {k: getattr(args, k) or defaults.get(k) for k in generator.SETTINGS}
    missing = [f"--{k}" for k, v in settings.items() if v is None]
    if missing:
        raise runs.UserError(f"{args.pipeline}: no defaults for {name} (known: {sorted(PIPELINE_DEFAULTS)}); "
                             f"pass {' '.join(missing)}")
    if release and args.cache != "none":  # diffusers' caches hook a transformer; these two denoise with a UNet
        raise runs.UserError(f"--cache {args.cache}: {name} denoises with a UNet, which diffusers' caches do not hook")
    if name not in generator.CACHE_PIPELINES.get(args.cache, (name,)):  # e.g. FasterCache on Wan: an IndexError mid-run
        raise runs.UserError(f"--cache {args.cache} runs on {', '.join(generator.CACHE_PIPELINES[args.cache])} "
                             f"only, not {name}")
    return name, settings


# ---- §4: G(t^s, noise), one call of the generator ----
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
    try:
        videos = pipe(**call).frames  # one (T, H, W, 3) array of floats in [0, 1] per prompt
    except ValueError as e:  # G's own check of its inputs (e.g. a module:Class G's size or caption): one line
        raise runs.UserError(f"{type(pipe).__name__}: {str(e).strip().splitlines()[0]} (G's call with {settings})") from e
    expected = (settings["num_frames"], settings["height"], settings["width"], 3)
    if videos[0].shape != expected:  # refused: generate_args.json would record another size
        raise runs.UserError(f"{type(pipe).__name__} returned frames of shape {videos[0].shape}, not {expected}: "
                             f"choose --height/--width/--num_frames that it supports")
    return [(frames * 255).round().clip(0, 255).astype(np.uint8) for frames in videos[:len(prompts)]]  # rounded


# ---- §4: V^s = G(t^s, noise) for each row ----
def render(calls, pipe, settings, out_dir, per_call=1):
    """V^s = G(t^s, noise) for the rows of each call, one call of G each (--prompts_per_call rows),
    written to <out_dir>/<syn_video> (video_io.write_video) where the video is not on disk yet."""
    # one thread encodes the videos of call i (x264 on one core, byte-stable: video_io.X264_PARAMS)
    # while G renders call i + 1; at most one call's videos wait, and a failed write stops the run
    with render_writer.Encoder(out_dir, settings["fps"]) as encoder:
        for batch in runs.progress(calls, total=len(calls), desc=f"rendering t^s ({per_call} a call)"):
            videos = generate(pipe, [r["neg_caption"] for r in batch], [r["seed"] for r in batch], settings)
            encoder.write(batch, videos)  # once call i - 1's videos are on disk: their error is raised here


def main(args):
    # ---- §4's input: the triplets (V^r, t^r = caption, t^s = neg_caption), bad rows skipped ----
    dist = runs.setup_distributed(timeout=args.dist_timeout)
    render_rows.check_flags(args)  # before any work: nothing is read, loaded or written for a flag that is wrong
    share = render_rows.this_share(args, dist)  # whose calls of G: this rank's of world_size, or --shard i/n's
    rows, todo, lines, counts, skipped = render_rows.read(args)  # bad rows named by line; --split, --misalignment, --limit
    for row in todo:  # the two output columns, both functions of the row's identity only
        row["syn_video"] = os.path.join("videos", render_rows.video_name(row))  # relative to out_dir, the CSV's folder
        # the seed of the row's noise: the same row gets the same frames whatever the number of
        # GPUs, the order of work or a rerun, and the same frames the same mp4, byte for byte
        row["seed"] = runs.example_seed(row["videopath"], row["neg_caption"], base=args.seed)
    # ---- §4: G's settings, the paper's for CogVideoX unless a flag says otherwise ----
    name, settings = resolve_settings(args)
    counts["truncated"] = generator.truncated_rows(args, name, todo, lines)  # t^s past G's text encoder: named
    runs.print0(f"{runs.plural(len(todo), 'row')} to render with {args.pipeline} ({name}, {settings}); "
                f"{render_rows.summary(counts)}")
    # settings-checked resume: the videos on disk were made from this input with these settings
    resume, record = os.path.join(args.out_dir, "resume.json"), render_rows.resume_record(args, settings)

    # ---- §4: V^s = G(t^s, noise), Eq. (3)'s synthetic video, for this rank's calls of G not yet on disk ----
    # The rows go to G in fixed calls of --prompts_per_call (rows 0-1, 2-3, ...), each rank takes every
    # world_size-th call: a video is rendered beside the same rows (a batch's shape can change a kernel's
    # rounding) whatever the GPU count; names and seeds come from the rows: a rerun on any GPU count (or
    # --shard n) finds what an earlier run finished.
    calls = runs.shard(render_rows.calls_of_g(todo, args.prompts_per_call), share)
    mine, left = render_rows.not_on_disk(calls, args.out_dir, args)  # rank 0 prints what is left of its share
    if os.path.exists(resume):  # other settings stop here, before G loads, unless no video is on disk yet
        disk.check_resume(resume, record, dist, kept=render_rows.videos_kept(args.out_dir))
    pipe = generator.load_generator(args, dist, settings) if mine else None  # G only when there is something to render
    disk.check_resume(resume, record, dist, kept=render_rows.videos_kept(args.out_dir))  # once G has loaded: a size it refused leaves no record
    if mine:
        start = time.time()
        render(mine, pipe, settings, args.out_dir, args.prompts_per_call)
        seconds = time.time() - start
        runs.print0(f"{render_rows.who(args)}: {runs.plural(left, 'video')} in {seconds:.1f} s ({seconds / left:.2f} s per video)")
    if args.shard:  # a shard's rows are on disk: the run without --shard writes generated.csv
        return render_rows.shard_done(todo, args)
    if not dist.master:  # the other ranks are done: rank 0 alone writes the outputs
        return

    # ---- rank 0 writes the CSV once every row's video is on disk (runs.wait_for_files) ----
    render_rows.wait_for_videos(todo, args.out_dir, dist)  # the other ranks' too, polled (--dist_timeout)
    # generated.csv, 02_weight.py's input: the selected rows in file order, the input's columns, then ours
    columns = [c for c in dict.fromkeys([*(rows[0] if rows else render_rows.REQUIRED), "syn_video", "seed"])
               if c is not None]
    disk.write_csv(os.path.join(args.out_dir, "generated.csv"), todo, fieldnames=columns)
    listed = render_rows.write_skipped(args.out_dir, skipped)  # its rows: the summary's bad rows, each once
    # the counts printed: bad rows skipped, rows of other splits or not selected, t^s truncated (file:line)
    disk.save_json(os.path.join(args.out_dir, "generate_args.json"),
                   {**asdict(args), "pipeline_class": name, "resolved": settings, "rows": len(todo), **counts})
    runs.print0(f"wrote {os.path.join(args.out_dir, 'generated.csv')}: {runs.plural(len(todo), 'row')}; "
                f"{render_rows.summary(counts)}" + (f", each listed in {listed}" if skipped else ""))


if __name__ == "__main__":
    runs.run_stage(main, Args)  # a user's mistake: `error: ...`, exit 2
