"""Everything README's CPU-sized chain (01 -> 02 -> 03 -> 04) needs, built offline in seconds:

    python tests/tiny_chain.py runs/tiny

<root>/cogvideox/            a tiny random CogVideoX (01's --pipeline)
<root>/{lavie,videocrafter2}/  tiny random LaVie and VideoCrafter2, each in its release's layout (01's other two)
<root>/vqa/{instructblip,clip-flant5,llava}/  three tiny random VQA members (02's --models)
<root>/video-llava/          a tiny random Video-LLaVA (03's and 04's --model)
<root>/mplug-owl/            a tiny random mPLUG-Owl (video), in the released checkpoint's layout (the other --model)
<root>/videos/real_K.mp4     16 real clips: a coloured square moving left or right (the --video_root)
<root>/videocon.csv          their VideoCon-layout triplets: 12 of split train, 4 of split test

The models are random: the chain's numbers mean nothing; it shows that the stages fit together.
"""
import os
import sys

import tiny
import tiny_generate
import tiny_lavie
import tiny_videocrafter2
import tiny_weight
from synvita import disk, video_io

COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "yellow": (255, 255, 0)}


def videocon_rows(root, n=16, n_test=4):
    """n clips and their triplets; t^s names the other direction (VideoCon's "action" type)."""
    rows = []
    for k in range(n):
        name, direction = list(COLOURS)[k % 4], 1 if (k // 4) % 2 == 0 else -1
        path = os.path.join(root, "videos", f"real_{k}.mp4")
        video_io.write_video(path, tiny.moving_square(color=COLOURS[name], direction=direction, seed=k))
        side, other = ("right", "left") if direction > 0 else ("left", "right")
        rows.append(dict(videopath=f"real_{k}.mp4", caption=f"a {name} square moves to the {side}",
                         neg_caption=f"a {name} square moves to the {other}", misalignment="action",
                         split="test" if k >= n - n_test else "train"))
    disk.write_csv(os.path.join(root, "videocon.csv"), rows)


def main(root):
    tiny_generate.tiny_cogvideox(os.path.join(root, "cogvideox"))
    tiny_lavie.tiny_lavie(os.path.join(root, "lavie"))
    tiny_videocrafter2.tiny_videocrafter2(os.path.join(root, "videocrafter2"))
    for name, build in (("instructblip", tiny_weight.tiny_instructblip), ("clip-flant5", tiny_weight.tiny_clip_flant5),
                        ("llava", tiny_weight.tiny_llava)):
        build(os.path.join(root, "vqa", name))
    tiny.tiny_video_llava(os.path.join(root, "video-llava"))
    tiny.tiny_mplug_owl(os.path.join(root, "mplug-owl"))
    videocon_rows(root)
    print(f"{root}: tiny models, 16 clips and videocon.csv written")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "runs/tiny")
