"""Benchmark (not a test): 04_eval.py's fast scoring against naive per-pair scoring, on the tiny
random Video-LLaVA of tests/tiny.py and an SSv2-Events-shaped workload: 49 query captions scored on
every one of --videos videos (SSv2-Events: 49 x 588).

  python tests/bench_eval.py --videos 12

naive      : tiny.alignment_logits one (video, caption) pair at a time, the whole prompt each time
             (video encoded, every prompt token run) - how a plain per-pair evaluation loop scores;
per-pair   : the same, with each video vision-encoded once (features=...), to separate the two savings;
fast       : 04_eval.py (tiny.alignment_logits on --video_batch videos at a time): each video encoded once,
             its prompt prefix run once per row of --batch_size caption suffixes packed after it.
Frames are decoded before timing (all three paths read the same in-memory frames). Prints the times,
the speed-ups and the largest |difference| of the alignment logits against the naive path.
"""
import argparse
import importlib.util
import os
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), HERE]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
common, tiny, shared_prefix, video_llm = map(importlib.import_module, (
    "common", "tiny", "synvita.shared_prefix", "synvita.video_llm"))  # through the path above

spec = importlib.util.spec_from_file_location("stage04", os.path.join(os.path.dirname(HERE), "04_eval.py"))
ev = sys.modules["stage04"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ev)


def captions49():
    """49 caption-like sentences of tests/tiny.py's grammar (10-15 words, as ATP-Hard's statements)."""
    return list(dict.fromkeys(line for line in tiny.corpus() if line.endswith(".") and len(line.split()) > 4))[:49]


@torch.no_grad()
def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--videos", type=int, default=12, help="videos; every one is scored against 49 captions")
    parser.add_argument("--batch_size", type=int, default=ev.Args.batch_size, help="04_eval.py --batch_size")
    parser.add_argument("--video_batch", type=int, default=ev.Args.video_batch, help="04_eval.py --video_batch")
    parser.add_argument("--frame_size", type=int, default=128,
                        help="frame size of the tiny model built here: (size/8)^2 + 1 tokens per frame; "
                             "128 gives 8 x 257 = 2056 video tokens per prompt, as Video-LLaVA-7B")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: steadier on a shared machine)")
    parser.add_argument("--model", default="", help="a saved model directory (default: build tests/tiny.py's)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model_dir = args.model or tiny.tiny_video_llava(tempfile.mkdtemp(prefix="bench-tiny-video-llava-"),
                                                         frame_size=args.frame_size)
    model, processor = video_llm.load_video_llm(model_dir)
    captions = captions49()
    frames = [tiny.moving_square(num_frames=8, size=args.frame_size, direction=1 - 2 * (k % 2), seed=k)
              for k in range(args.videos)]
    pairs = [(v, c) for v in range(args.videos) for c in captions]
    print(f"workload: {len(captions)} captions x {args.videos} videos = {len(pairs)} pairs, "
          f"{shared_prefix.encode_videos(model, processor, frames[:1]).shape[1]} video tokens per prompt, "
          f"torch threads {torch.get_num_threads()}")

    # the three paths take turns on each group of --video_batch videos, so that load from other
    # processes on the machine falls on all three alike; times are summed over the groups
    seconds, naive, per_pair, fast = [0.0, 0.0, 0.0], [], [], []
    for first in range(0, args.videos, args.video_batch):  # as 04_eval.score_task batches videos
        chunk = list(range(first, min(first + args.video_batch, args.videos)))
        start = time.perf_counter()
        naive += [tiny.alignment_logits(model, processor, [frames[v]], [c]) for v in chunk for c in captions]
        seconds[0] += time.perf_counter() - start

        start = time.perf_counter()
        features = shared_prefix.encode_videos(model, processor, [frames[v] for v in chunk])
        per_pair += [tiny.alignment_logits(model, processor, None, [c], features=features[k:k + 1])
                     for k in range(len(chunk)) for c in captions]
        seconds[1] += time.perf_counter() - start

        start = time.perf_counter()  # as 04_eval.score_task calls it
        index = [k for k in range(len(chunk)) for _ in captions]
        fast.append(tiny.alignment_logits(model, processor, [frames[v] for v in chunk], captions * len(chunk), index,
                                            per_row=args.batch_size))
        seconds[2] += time.perf_counter() - start
    naive, per_pair, fast = torch.cat(naive), torch.cat(per_pair), torch.cat(fast)
    t_naive, t_per_pair, t_fast = seconds

    print(f"naive per-pair          {t_naive:8.2f} s  {len(pairs) / t_naive:8.1f} pairs/s")
    print(f"per-pair, video once    {t_per_pair:8.2f} s  {len(pairs) / t_per_pair:8.1f} pairs/s")
    print(f"fast (04_eval.py)       {t_fast:8.2f} s  {len(pairs) / t_fast:8.1f} pairs/s")
    print(f"speed-up vs naive {t_naive / t_fast:.1f}x, "
          f"vs per-pair with the video encoded once {t_per_pair / t_fast:.1f}x")
    print(f"max |a_fast - a_naive| = {(fast - naive).abs().max().item():.2e}, "
          f"max |a_per_pair - a_naive| = {(per_pair - naive).abs().max().item():.2e}")
    assert torch.allclose(fast, naive, atol=1e-5), "the fast path disagrees with the per-pair path"


if __name__ == "__main__":
    main()
