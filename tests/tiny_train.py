"""A toy training set for 03_train.py, written offline: real and "synthetic" mp4s of a coloured
square moving left or right, and the CSV that 02_weight.py would write for them.

Layout (as the stages lay it out): <root>/videos/real_K.mp4 (the --video_root) and
<root>/gen/weighted.csv with syn_video = videos/syn_K.mp4 relative to <root>/gen, and
<root>/feedback.csv: VideoCon's explanation (NLE) rows for the same videos, all of split `train`.
"""
import os

import tiny
from synvita import disk, video_io

COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "yellow": (255, 255, 0)}


def side(direction):
    return "right" if direction > 0 else "left"


def toy_rows(n=8, twin="syn"):
    """n rows: colour x direction; t^s flips the direction (VideoCon's "action" misalignment).
    twin: the name of the synthetic videos (videos/<twin>_K.mp4), one per "generator"."""
    rows = []
    for k in range(n):
        name, direction = list(COLOURS)[k % 4], 1 if (k // 4) % 2 == 0 else -1
        fr = round(0.1 * (k % 5), 2)  # fbar(V^s, t^r); fbar(V^s, t^s) = 0.8 -> Eq. 4 gives 0.8 - fr
        rows.append(dict(videopath=f"real_{k}.mp4", caption=f"a {name} square moves to the {side(direction)}",
                         neg_caption=f"a {name} square moves to the {side(-direction)}", misalignment="action",
                         syn_video=f"videos/{twin}_{k}.mp4", score_syn_target=0.8, score_syn_real=fr,
                         weight=round(0.8 - fr, 2), colour=name, direction=direction))
    return rows


def write_toy_set(root, n=8, weights=None, name="weighted.csv", twin="syn", twin_seed=100):
    """Write the videos and <root>/gen/<name>; returns (csv path, video root).
    weights: optional list overriding the `weight` column. twin, twin_seed: another "generator's"
    synthetic videos (videos/<twin>_K.mp4, drawn with seed twin_seed + K) for the same real triplets."""
    rows = toy_rows(n, twin)
    for k, r in enumerate(rows):
        colour, direction = COLOURS[r.pop("colour")], r.pop("direction")
        real, syn = os.path.join(root, "videos", r["videopath"]), os.path.join(root, "gen", r["syn_video"])
        if not os.path.exists(real):
            video_io.write_video(real, tiny.moving_square(color=colour, direction=direction, seed=k))
        if not os.path.exists(syn):  # the "generated" twin shows t^s: same square, the other way, another background
            video_io.write_video(syn, tiny.moving_square(color=colour, direction=-direction, seed=twin_seed + k))
        if weights is not None:
            r["weight"] = weights[k]
    csv_path = os.path.join(root, "gen", name)
    disk.write_csv(csv_path, rows)
    disk.write_csv(os.path.join(root, "feedback.csv"), [
        dict(videopath=r["videopath"], caption=r["caption"], neg_caption=r["neg_caption"], split="train",
             nle=f"the square moves to the {r['caption'].split()[-1]}, not to the {r['neg_caption'].split()[-1]}")
        for r in rows])
    return csv_path, os.path.join(root, "videos")
