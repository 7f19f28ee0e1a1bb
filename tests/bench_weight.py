"""Benchmark (not a test; pytest does not collect it): 02_weight.py's VQAScores of one synthetic video
(4 frames x t^s, t^r) with each frame encoded once (frame_scores, what score_video runs) against one
full forward per (frame, caption) pair, the image encoded again each time (vqa_scores, t2v_metrics'
way), on tiny random members built offline, side by side in one run: interleaved repeats, median
times, the ratio per member and for the ensemble (a video through all three), and max |delta score|.

    OMP_NUM_THREADS=1 python tests/bench_weight.py              # --repeats 15; --default_towers: tests' members

The tiny members of the tests have vision towers so small that they are a negligible part of the
time, unlike the real ones: here each member's image side is PROPORTIONATE to the real one's, with
the real token counts (InstructBLIP 256 patches; CLIP-FlanT5 and LLaVA-1.5 576 patches = 336/14
squared, in T5's input and LLaVA's prompt) and tower sizes chosen so that the tower's measured share
of a pair's time is near its real share of a pair's FLOPs (both printed). The real-size estimate
(real_size_estimate) counts the FLOPs of the real members from their hub configs.
"""
import argparse
import datetime
import importlib
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), HERE]
tiny, tiny_weight = map(importlib.import_module, ("tiny", "tiny_weight"))  # through the path above

vqa, clip_t5 = map(importlib.import_module, ("synvita.vqa", "synvita.clip_t5"))  # 02_weight.py's VQAScore, its members
CAPTIONS = ["a blue circle jumps over the box", "a red square moves to the right and then stops"]  # t^s, t^r
T = 4  # frames of V^s (the paper's)

# ---- the real members, from their hub configs: FLOPs of one (frame, caption) pair ------------------
# One forward = 2 FLOPs per multiply-add. A transformer layer on n tokens reading L keys:
# 2 n (4 d^2 + m d f) for the projections and MLP (m = 2 matrices, 3 if gated) + 4 n L d for attention.
Q = 32  # text tokens of "Does this figure show "<t>"? Please answer yes or no." with a ~12-word caption


def layers(n, L, d, f, depth, gated=False):
    """FLOPs of `depth` transformer layers (width d, MLP width f) on n tokens, each reading L keys."""
    return depth * (2 * n * (4 * d * d + (3 if gated else 2) * d * f) + 4 * n * L * d)


def t5_xxl(n, k=1):
    """Flan-T5-XXL (d 4096, d_ff 10240 gated-gelu, 24 + 24 layers, vocabulary 32128): the encoder on n
    tokens, the decoder on k answer tokens (cross-attention K, V over the n encoder states: 4 n d^2 a layer)."""
    d, f = 4096, 10240
    decoder = layers(k, k, d, f, 24, gated=True) + 24 * (2 * k * 2 * d * d + 4 * n * d * d + 4 * k * n * d)
    return layers(n, n, d, f, 24, gated=True) + decoder + 2 * k * d * 32128


def real_size_estimate():
    """{member: (image side's FLOPs, the rest of a pair's FLOPs today, the rest with shared encoding)} per
    (frame, caption) pair, 2 captions a frame; token counts: prompts as 02_weight.py builds them."""
    clip_l336 = layers(577, 577, 1024, 4096, 24)  # CLIP ViT-L/14 at 336: 24 x 24 patches + CLS
    vit_g = layers(257, 257, 1408, 6144, 39)  # EVA ViT-g/14 at 224 (InstructBLIP keeps 39 of its 40 layers)
    # InstructBLIP: the Q-Former (BERT-base, 12 layers) on 32 queries + the question, cross-attending to
    # the 257 patches every other layer; then T5 on 32 query tokens + "Question: ..." (Q + 3 tokens)
    qformer = layers(32 + Q, 32 + Q, 768, 3072, 12) + 6 * (2 * 257 * 2 * 1408 * 768 + 2 * 32 * 2 * 768 * 768)
    instructblip = (vit_g, qformer + t5_xxl(32 + Q + 3), qformer + t5_xxl(32 + Q + 3))
    # CLIP-FlanT5: the mlp2x projector (1024 -> 4096 -> 4096) on 576 patches; T5 on the system prompt and
    # "USER:" (~36 tokens), 576 patches, the question and " ASSISTANT:" (~5)
    clip_t5_image = clip_l336 + 2 * 576 * (1024 * 4096 + 4096 * 4096)
    clip_t5 = (clip_t5_image, t5_xxl(36 + 576 + Q + 5), t5_xxl(36 + 576 + Q + 5))
    # LLaVA-1.5-13B: projector 1024 -> 5120 -> 5120; Vicuna-13B (d 5120, SwiGLU 13824, 40 layers) on
    # [BOS "USER:" 576 image tokens] = the prefix (580), then the question and "ASSISTANT:" (Q + 5)
    llava_image = clip_l336 + 2 * 576 * (1024 * 5120 + 5120 * 5120)
    prefix, suffix = 580, Q + 5
    whole = layers(prefix + suffix, prefix + suffix, 5120, 13824, 40, gated=True)
    shared = layers(prefix, prefix, 5120, 13824, 40, gated=True) / 2 + layers(suffix, prefix + suffix, 5120, 13824, 40,
                                                                              gated=True)  # the prefix: 1 of 2 pairs
    return {"InstructBLIP-FlanT5-XXL": instructblip, "CLIP-FlanT5-XXL": clip_t5, "LLaVA-1.5-13B": (llava_image, whole, shared)}


def print_real_size_estimate():
    """The table of real_size_estimate, TFLOPs per pair, and the ratios it implies."""
    print(f"Real size (FLOPs from the hub configs; question ~{Q} tokens; per pair, 2 captions a frame):")
    print(f"{'member':<26}{'image':>8}{'rest':>8}{'today':>8}{'shared':>8}{'ratio':>7}{'image share':>13}")
    total_today = total_shared = 0
    for name, (image, rest, rest_shared) in real_size_estimate().items():
        today, shared = image + rest, image / 2 + rest_shared  # shared: the image side once for 2 captions
        total_today, total_shared = total_today + today, total_shared + shared
        print(f"{name:<26}{image / 1e12:>8.3f}{rest / 1e12:>8.2f}{today / 1e12:>8.2f}{shared / 1e12:>8.2f}"
              f"{today / shared:>6.2f}x{image / today:>12.0%}")
    print(f"{'ensemble':<26}{'':>16}{total_today / 1e12:>8.2f}{total_shared / 1e12:>8.2f}{total_today / total_shared:>6.2f}x")
    return {name: (image / (image + rest), image + rest) for name, (image, rest, _) in real_size_estimate().items()}


# ---- the tiny members, image side proportionate to the real ones' --------------------------------
# (builder, its sizes, the real member it stands for, the module whose time is the image side's)
MEMBERS = {
    "instructblip": (tiny_weight.tiny_instructblip, dict(frame_size=64, patch=4, vision_hidden=64, vision_layers=2),
                     "InstructBLIP-FlanT5-XXL", lambda m: m.vision_model),
    "clip-flant5": (tiny_weight.tiny_clip_flant5, dict(frame_size=96, patch=4, vision_hidden=8, vision_layers=1),
                    "CLIP-FlanT5-XXL", lambda m: m.vision_tower.vision_tower),
    "llava": (tiny_weight.tiny_llava, dict(frame_size=96, patch=4, vision_hidden=8, vision_layers=1, hidden=128),
              "LLaVA-1.5-13B", lambda m: m.model.vision_tower),
}
DEFAULT_TOWERS = {"instructblip": {}, "clip-flant5": {}, "llava": {}}  # --default_towers: the tests' members


def per_pair(model, processor, frames):
    """Today's way (t2v_metrics'): every (frame, caption) pair a full forward, 8 pairs in one call."""
    return vqa.vqa_scores(model, processor, [f for _ in CAPTIONS for f in frames],
                          [c for c in CAPTIONS for _ in frames], 2 * T).view(2, T)


def shared(model, processor, frames):
    """score_video's way: each frame encoded once for both captions, the 4 frames in one call."""
    return vqa.frame_scores(model, processor, frames, CAPTIONS, T)


def tower_share(model, processor, frames, tower, repeats):
    """The image side's share of the per-pair path's time: its forwards timed by hooks."""
    spent, start = [0.0], [0.0]
    pre = tower.register_forward_pre_hook(lambda *a: start.__setitem__(0, time.perf_counter()))
    post = tower.register_forward_hook(lambda *a: spent.__setitem__(0, spent[0] + time.perf_counter() - start[0]))
    begin = time.perf_counter()
    for _ in range(repeats):
        per_pair(model, processor, frames)
    total = time.perf_counter() - begin
    pre.remove(), post.remove()
    return spent[0] / total


def bench(members, repeats, real):
    """Each member: the two ways interleaved (A B A B ...), median seconds each, ratio, max |delta|."""
    frames = tiny.moving_square(num_frames=T, size=96)  # (T, 96, 96, 3) uint8; the processors resize
    times, worst = {}, 0.0
    with tempfile.TemporaryDirectory() as folder:
        for name, (build, sizes, stands_for, tower) in members.items():
            model, processor = clip_t5.load_member(build(os.path.join(folder, name), **sizes))
            for vqascore in ("first_token", "t2v_metrics"):  # the same scores, both definitions
                a = vqa.vqa_scores(model, processor, [f for _ in CAPTIONS for f in frames],
                                   [c for c in CAPTIONS for _ in frames], 1, vqascore).view(2, T)
                worst = max(worst, float((a - vqa.frame_scores(model, processor, frames, CAPTIONS, T, vqascore)).abs().max()))
            for way in (per_pair, shared):  # warm-up
                way(model, processor, frames)
            runs = {per_pair: [], shared: []}
            for _ in range(repeats):
                for way in (per_pair, shared):
                    begin = time.perf_counter()
                    way(model, processor, frames)
                    runs[way].append(time.perf_counter() - begin)
            times[name] = [statistics.median(runs[w]) for w in (per_pair, shared)]
            share = tower_share(model, processor, frames, tower(model), max(3, repeats // 3))
            print(f"{name:<14}{times[name][0] * 1e3:>10.1f}{times[name][1] * 1e3:>10.1f}"
                  f"{times[name][0] / times[name][1]:>8.2f}x{share:>15.0%}{real[stands_for][0]:>12.0%}")
    old, new = (sum(t[i] for t in times.values()) for i in (0, 1))
    print(f"{'ensemble':<14}{old * 1e3:>10.1f}{new * 1e3:>10.1f}{old / new:>8.2f}x   (the tiny members' times summed)")
    # the tiny members' costs are not in the real ones' proportions: each member's measured ratio,
    # weighted by its real FLOPs today (LLaVA-1.5-13B ~65 % of the ensemble's)
    flops = {stands_for: real[stands_for][1] for _, _, stands_for, _ in members.values()}
    ratios = {stands_for: times[n][0] / times[n][1] for n, (_, _, stands_for, _) in members.items()}
    print(f"{'ensemble, real weights':<34}{sum(flops.values()) / sum(f / ratios[m] for m, f in flops.items()):>6.2f}x"
          "   (measured ratios, each member weighted by its real FLOPs)")
    print(f"max |delta score| over the members, first_token and t2v_metrics: {worst:.2e}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15, help="timed runs of each way, interleaved")
    parser.add_argument("--default_towers", action="store_true", help="the tests' members (towers negligible)")
    args = parser.parse_args()
    cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model_name = next((line.split(":", 1)[1].strip() for line in cpu.splitlines() if line.startswith("Model name")), "?")
    print(f"{datetime.date.today()}, {model_name}, torch threads {torch.get_num_threads()}")
    real = print_real_size_estimate()  # {member: (image share, FLOPs of a pair today)}
    members = {n: (b, DEFAULT_TOWERS[n] if args.default_towers else s, r, t) for n, (b, s, r, t) in MEMBERS.items()}
    print(f"\nTiny members, one video (4 frames x 2 captions), median of {args.repeats} interleaved runs:")
    print(f"{'member':<14}{'pairs ms':>10}{'shared ms':>10}{'ratio':>9}{'tower share':>15}{'real share':>12}")
    bench(members, args.repeats, real)


if __name__ == "__main__":
    main()
