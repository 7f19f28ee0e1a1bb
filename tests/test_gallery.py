"""02's gallery (<stem>_gallery.html): the synthetic videos beside the real ones, their captions, fbar and
phi, one self-contained page that opens from disk; rendered in headless Chromium where it is installed."""
import csv
import importlib
import os
import re
import shutil
import subprocess
import types

import numpy as np
import pytest

import tiny
from synvita import disk, gallery, video_io

weight = importlib.import_module("02_weight")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="no chromium: .ci/run installs Debian's package")
NAMES = ["m1", "m2"]


def write_run(folder, broken_syn=True):
    """A weighted.csv as 02 writes it (2 types x 4 rows, members m1 and m2), its real videos (red squares)
    and synthetic ones (blue), one V^s that cannot be decoded, one caption that is HTML."""
    os.makedirs(folder / "videos", exist_ok=True)
    rows = []
    for k in range(8):
        kind = ("action", "flip")[k % 2]
        real, syn = f"videos/real_{k}.mp4", f"videos/syn_{k}.mp4"
        video_io.write_video(str(folder / real), tiny.moving_square(color=(255, 0, 0), seed=k))
        video_io.write_video(str(folder / syn), tiny.moving_square(color=(0, 0, 255), direction=-1, seed=k))
        ft, fr = 0.9 - 0.1 * k, 0.1 + 0.1 * k
        rows.append({"videopath": real, "caption": f"a red square moves right {k}",
                     "neg_caption": f"a red square moves left {k}", "misalignment": kind, "syn_video": syn,
                     **{f"vqascore_{s}_{n}": f"{v:.3f}" for n in NAMES for s, v in (("target", ft), ("real", fr))},
                     "score_syn_target": ft, "score_syn_real": fr, "weight": max(0.0, ft - fr)})
    rows[0]["caption"] = 'a square <script>alert("x")</script> & more'  # shown as text, never run
    rows[0]["neg_caption"] = 'a square <script>alert("x")</script> & less'
    if broken_syn:
        open(folder / rows[2]["syn_video"], "wb").write(b"not an mp4")  # a named placeholder, not a broken page
    rows.append({**rows[1], "weight": "", "score_syn_target": "", "score_syn_real": ""})  # kept without a weight
    path = folder / "weighted.csv"
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return str(path)


def make_gallery(folder, per_type=1, video_root=None):
    out_csv = write_run(folder)
    args = types.SimpleNamespace(generated_csv="generated.csv", models=NAMES, vqascore="first_token",
                                 weighting="difference", num_frames=4, split="train", gallery_per_type=per_type,
                                 video_root=str(folder) if video_root is None else video_root)
    scored = [r for r in disk.read_csv(out_csv) if r["weight"]]
    table = weight.fig2_table([{**r, "score_syn_target": float(r["score_syn_target"]),
                                "score_syn_real": float(r["score_syn_real"])} for r in scored])
    return gallery.write_gallery(args, out_csv, NAMES, str(folder), table)


def test_the_page_shows_the_highest_middle_and_lowest_phi_of_each_type(tmp_path):
    page = open(make_gallery(tmp_path), encoding="utf-8").read()
    # per type, 1 per section: action has phi 0.8, 0.4, 0.0, 0.0 (lines 2, 4, 6, 8), flip 0.6, 0.2, 0, 0
    sections = re.findall(r"(highest phi|middle|lowest phi) · weighted.csv:(\d+)", page)
    assert sections == [("highest phi", "2"), ("middle", "4"), ("lowest phi", "8"),
                        ("highest phi", "3"), ("middle", "5"), ("lowest phi", "9")]
    assert "weighted.csv:10" not in page  # the row without a weight is not shown (weighted_skipped.csv lists it)
    assert page.count('<img src="data:image/jpeg;base64,') == 4 * (6 + 6) - 4  # V^r and V^s, 4 frames; one V^s broken
    assert "syn_2.mp4: cannot decode video" in page  # the undecodable V^s (line 4), named in its place
    assert "<script" not in page and "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; <mark>more</mark>" in page
    # the words outside LCS(t^r, t^s) are marked: what t' hides
    assert "a red square moves <mark>right</mark> 0" not in page and "moves <mark>left</mark> 2" in page
    assert not re.findall(r'(?:src|href)="(?!data:)', page)  # nothing to fetch: it opens offline


def test_without_video_root_the_real_video_is_a_named_placeholder(tmp_path):
    page = open(make_gallery(tmp_path, video_root=""), encoding="utf-8").read()
    assert page.count("V^r not shown: pass --video_root") == 6 and page.count("data:image/jpeg") == 4 * 6 - 4


def test_the_header_shows_paths_below_the_working_folder_relative(tmp_path, monkeypatch):
    """Issue 32: a page to share names no machine's folder: --models and --generated_csv given as
    absolute paths below the working folder are shown relative to it; others as given."""
    monkeypatch.chdir(tmp_path)
    out_csv = write_run(tmp_path)
    args = types.SimpleNamespace(generated_csv=str(tmp_path / "generated.csv"), models=[str(tmp_path / "vqa" / "m0"), "org/m1"],
                                 vqascore="first_token", weighting="difference", num_frames=4, split="train",
                                 gallery_per_type=1, video_root="")
    page = open(gallery.write_gallery(args, out_csv, NAMES, str(tmp_path), {}), encoding="utf-8").read()
    header = page.split("</style>")[1].split("<h2>")[0]  # the title and the settings table
    assert str(tmp_path) not in header
    assert "<h1>weighted.csv</h1>" in page and "<td>generated.csv</td>" in page and "[&#x27;vqa/m0&#x27;, &#x27;org/m1&#x27;]" in page


def render(page, out_png, height=2400):
    """The page in headless Chromium, as a screenshot (H, W, 3) uint8, and every file the browser was
    asked to load (its verbose log's FileURLLoader lines): a self-contained page loads itself only."""
    from PIL import Image
    done = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr", "--v=1",
                           f"--screenshot={out_png}", f"--window-size=1200,{height}", f"file://{page}"],
                          capture_output=True, text=True, timeout=120)
    assert os.path.exists(out_png), done.stderr[-2000:]
    loaded = re.findall(r"FileURLLoader::Start: (\S+)", done.stderr)
    requested = re.findall(r"Start request.*?(https?://\S+)", done.stderr)  # a page that reached for the network
    return np.asarray(Image.open(out_png).convert("RGB")), loaded, requested


def frame_pixels(shot, color):
    """How many pixels of the screenshot are close to `color` (a frame's square, never a page colour)."""
    return int((np.abs(shot.astype(int) - color).max(axis=2) < 60).sum())


@needs_chromium
def test_chromium_draws_every_frame_offline(tmp_path):
    page = make_gallery(tmp_path)
    shot, loaded, requested = render(page, str(tmp_path / "shot.png"))
    assert loaded == [f"file://{page}"] and not requested
    # the real videos' red squares and the synthetic ones' blue: drawn, in every entry that has them
    assert frame_pixels(shot, (255, 0, 0)) > 6 * 4 * 20 and frame_pixels(shot, (0, 0, 255)) > 5 * 4 * 20
    # the check can fail: the same page with its images removed has no frame pixels
    bare = tmp_path / "bare.html"
    bare.write_text(re.sub(r'<img src="data:[^"]*"[^>]*>', "", open(page, encoding="utf-8").read()), encoding="utf-8")
    shot, _, _ = render(str(bare), str(tmp_path / "bare.png"))
    assert frame_pixels(shot, (255, 0, 0)) == 0 and frame_pixels(shot, (0, 0, 255)) == 0
