"""01_generate.py on a tiny random CogVideoX (tests/tiny_generate.py), offline, on the CPU."""
import contextlib
import csv
import glob
import importlib
import io
import json
import os
import subprocess
import sys

import decord
import numpy as np
import pytest
import torch

import common
import tiny_generate
from test_cluster import assert_ran, torchrun_nodes
from tiny import assert_user_error, run_main
from synvita import generator, runs, video_io

gen = importlib.import_module("01_generate")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(height=32, width=64, num_frames=9, num_inference_steps=2)  # 9 frames = 3 latent frames
HEADER = ["videopath", "caption", "neg_caption", "misalignment", "split"]
GOOD = [
    ["act/v1.mp4", "A man rides a horse.", "A woman rides a horse.", "object", "train"],
    ["act/v2.mp4", "A dog runs to the left.", "A dog runs to the right.", "action", "train"],
    ["act/v3.mp4", "Two cats sleep on a sofa.", "Three cats sleep on a sofa.", "count", "train"],
    ["act/v4.mp4", "A red ball rolls.", "A blue ball rolls.", "attribute", "train"],
]


@pytest.fixture(scope="module")
def tiny_pipe(tmp_path_factory):
    return tiny_generate.tiny_cogvideox(str(tmp_path_factory.mktemp("tiny-cogvideox")))


def write_rows(path, rows, header=HEADER):
    with open(path, "w", newline="", encoding="utf-8") as fh:
        csv.writer(fh).writerows([header, *rows])
    return str(path)


def args_for(input_csv, out_dir, pipe, **kw):
    return gen.Args(input_csv=str(input_csv), out_dir=str(out_dir), pipeline=pipe, **{**TINY, **kw})


def run(args):
    """main(args) -> what it printed."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        gen.main(args)
    return out.getvalue()


def read_out(out_dir):
    with open(os.path.join(out_dir, "generated.csv"), newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def final_mp4s(out_dir):
    return sorted(p for p in glob.glob(os.path.join(out_dir, "videos", "*.mp4")) if ".tmp" not in p)


@pytest.fixture(scope="module")
def first_run(tiny_pipe, tmp_path_factory):
    """One run over 3 good rows, 4 bad ones and one row of another split."""
    tmp = tmp_path_factory.mktemp("gen")
    rows = GOOD[:3] + [
        ["act/v1.mp4", "A man\nrides.", *GOOD[0][2:]],  # lines 5-6: same videopath and neg_caption as line 2
        GOOD[1],  # line 7: exact duplicate of line 3
        ["act/v5.mp4", "A cat jumps.", "  ", "action", "train"],  # line 8: empty neg_caption
        ["act/v6.mp4", "", "A bird walks.", "action", "train"],  # line 9: empty caption
        ["act/v7.mp4", "A car turns.", "A car stops.", "action"],  # line 10: a field short
        ["act/v8.mp4", "A kid sings.", "A kid shouts.", "action", "test"],  # another split: not asked for
    ]
    args = args_for(write_rows(tmp / "in.csv", rows), tmp / "out", tiny_pipe)
    return args, run(args)


def test_one_decodable_video_per_good_row_with_its_seed(first_run):
    args, _ = first_run
    out = read_out(args.out_dir)
    assert list(out[0]) == HEADER + ["syn_video", "seed"]
    assert [[r[c] for c in HEADER] for r in out] == GOOD[:3]  # input columns kept, file order
    videos = []
    for r in out:
        assert int(r["seed"]) == runs.example_seed(r["videopath"], r["neg_caption"], base=0)
        path = os.path.join(args.out_dir, r["syn_video"])  # relative to the CSV's folder
        assert len(decord.VideoReader(path)) == 9
        frames = video_io.read_video(path, num_frames=9)
        assert frames.shape == (9, 32, 64, 3)
        videos.append(frames.astype(float))
    assert final_mp4s(args.out_dir) == sorted(os.path.join(args.out_dir, r["syn_video"]) for r in out)
    # a real video, not a constant: frames vary, and two rows (prompt and seed differ) differ
    assert videos[0].std() > 5 and np.abs(videos[0] - videos[1]).mean() > 5


def test_bad_rows_are_named_skipped_and_counted(first_run):
    args, printed = first_run
    # physical lines: the quoted newline in line 5's caption makes the next row line 7
    assert f"{args.input_csv}: 1 row(s) skipped, same videopath and neg_caption as an earlier row: line(s) 5" in printed
    assert f"{args.input_csv}: 1 row(s) skipped, exact duplicate of an earlier row: line(s) 7" in printed
    assert f"{args.input_csv}: 1 row(s) skipped, empty neg_caption: line(s) 8" in printed
    assert f"{args.input_csv}: 1 row(s) skipped, empty caption: line(s) 9" in printed
    assert f"{args.input_csv}: 1 row(s) skipped, not 5 fields as in the header: line(s) 10" in printed
    assert "3 rows to render" in printed and "5 bad rows skipped" in printed  # split test: not asked for, not bad
    assert "5 bad rows skipped, 1 row of other splits left out (--split)" in printed  # counted, apart from the bad
    # issue 37 item 4: each listed once, in file order, with its line and reason, as 03's and 04's skip
    # files (a bad row's cells are not kept: its videopath is empty); the count printed is the file's
    listed = os.path.join(args.out_dir, "generated_skipped.csv")
    assert f"5 bad rows skipped, 1 row of other splits left out (--split), each listed in {listed}" in printed
    with open(listed, newline="", encoding="utf-8") as fh:
        assert list(csv.reader(fh)) == [["file", "line", "videopath", "reason"]] + [[args.input_csv, *r] for r in [
            ["5", "act/v1.mp4", "same videopath and neg_caption as line 2"],
            ["7", "", "exact duplicate of an earlier row"], ["8", "", "empty neg_caption"], ["9", "", "empty caption"],
            ["10", "", "not 5 fields as in the header"]]]
    assert json.loads(open(os.path.join(args.out_dir, "generate_args.json")).read())["skipped"] == 5


def test_a_rerun_with_another_selection_or_settings_stops_and_keeps_the_csv(first_run, tiny_pipe):
    """Issue 14 item 3: a rerun into the same out_dir that selects other rows (another --split, a
    misspelt --misalignment) or renders with other settings stops, naming what differs; the CSV stays."""
    args, _ = first_run
    before = read_out(args.out_dir)
    with pytest.raises(ValueError, match=r"no usable row with --split 'train' and --misalignment \['acton'\]"):
        run(args_for(args.input_csv, args.out_dir, tiny_pipe, misalignment=["acton"]))
    with pytest.raises(ValueError, match=r"resume.json: the work here was made with other settings \(split: 'train' then, 'test' now\)"):
        run(args_for(args.input_csv, args.out_dir, tiny_pipe, split="test"))
    with pytest.raises(ValueError, match=r"num_inference_steps: 2 then, 3 now"):
        run(args_for(args.input_csv, args.out_dir, tiny_pipe, num_inference_steps=3))
    assert read_out(args.out_dir) == before


def test_bad_bytes_and_header_only_files_name_the_file_and_line(tmp_path, tiny_pipe):
    """Issue 14 items 12 and 14: a byte that is not UTF-8 is named by file and physical line; a
    header-only file is an error, not an empty run."""
    path = write_rows(tmp_path / "in.csv", [GOOD[0], ["act/v1.mp4", "A man\nrides.", "A horse.", "object", "train"]])
    with open(path, "ab") as fh:
        fh.write(b"act/v9.mp4,Un caf\xe9,Un th\xe9,object,train\r\n")
    with pytest.raises(ValueError, match=rf"{path}:5: byte 0xe9 is not UTF-8"):
        gen.main(args_for(path, tmp_path / "out", tiny_pipe))
    path = write_rows(tmp_path / "in.csv", [])
    with pytest.raises(ValueError, match=rf"{path}: no usable row \(only a header\)"):
        gen.main(args_for(path, tmp_path / "out", tiny_pipe))


def test_missing_column_names_the_file(tmp_path, tiny_pipe):
    path = write_rows(tmp_path / "in.csv", [r[:3] for r in GOOD], header=HEADER[:3])
    with pytest.raises(ValueError, match=rf"{path}: missing column\(s\) \['misalignment'\]"):
        gen.main(args_for(path, tmp_path / "out", tiny_pipe))


def test_second_run_generates_nothing_new(first_run, monkeypatch):
    args, _ = first_run
    before = {p: os.stat(p).st_mtime_ns for p in final_mp4s(args.out_dir)}
    csv_before = read_out(args.out_dir)
    monkeypatch.setattr(generator, "load_generator", lambda *a: pytest.fail("the generator was loaded again"))
    skipped_before = open(os.path.join(args.out_dir, "generated_skipped.csv"), "rb").read()
    printed = run(args)
    assert "rank 0: 0 of its 3 rows to render" in printed
    assert {p: os.stat(p).st_mtime_ns for p in final_mp4s(args.out_dir)} == before
    assert read_out(args.out_dir) == csv_before
    assert open(os.path.join(args.out_dir, "generated_skipped.csv"), "rb").read() == skipped_before  # the same bytes


def test_misalignment_and_limit_select_rows(tmp_path, tiny_pipe):
    path = write_rows(tmp_path / "in.csv", GOOD)
    # a type is read without case or spaces: "Action " selects the action rows (issue 26)
    printed = run(args_for(path, tmp_path / "out", tiny_pipe, misalignment=["Action ", "attribute", "flip"], limit=1))
    assert [r["videopath"] for r in read_out(tmp_path / "out")] == ["act/v2.mp4"]
    assert len(final_mp4s(tmp_path / "out")) == 1
    assert "--misalignment 'flip': no usable row of this type" in printed


KILL_SECOND_VIDEO = """
import importlib, os, sys
sys.path[:0] = [{root!r}, {tests!r}]
import av
gen = importlib.import_module("01_generate")
real_open, opened = av.open, []
def open_then_die(path, mode="r", **kw):  # the 2nd mp4 gets one frame on disk, then the process dies
    container = real_open(path, mode, **kw)
    opened.append(path)
    if len(opened) == 2:
        real_mux = container.mux
        class Dying:
            __enter__ = lambda self: self
            __exit__ = lambda self, *exc: container.__exit__(*exc)
            add_stream = lambda self, *a, **k: container.add_stream(*a, **k)
            def mux(self, packets):
                if not packets:  # the encoder is still buffering frames
                    return real_mux(packets)
                real_mux(packets[:1])
                container.close()  # a truncated mp4: one frame of nine reached the disk
                os._exit(9)  # then kill -9: no finally, no atexit
        return Dying()
    return container
av.open = open_then_die
gen.main(gen.Args(input_csv={csv!r}, out_dir={out!r}, pipeline={pipe!r}, height=32, width=64, num_frames=9,
                  num_inference_steps=2))
"""


def test_a_killed_run_leaves_no_partial_video_marked_done(tmp_path, tiny_pipe, first_run):
    path = write_rows(tmp_path / "in.csv", GOOD[:3])
    out = tmp_path / "out"
    script = KILL_SECOND_VIDEO.format(root=ROOT, tests=os.path.join(ROOT, "tests"), csv=path, out=str(out),
                                      pipe=tiny_pipe)
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    killed = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert killed.returncode == 9, killed.stderr[-3000:]
    partial = glob.glob(str(out / "videos" / "*.tmp*.mp4"))
    assert len(partial) == 1 and len(decord.VideoReader(partial[0])) == 1  # killed while writing video 2
    assert len(final_mp4s(out)) == 1 and not os.path.exists(out / "generated.csv")

    printed = run(args_for(path, out, tiny_pipe))  # resume: video 1 is done, 2 and 3 are not
    assert "rank 0: 2 of its 3 rows to render" in printed
    rows = read_out(out)
    assert [r["videopath"] for r in rows] == [r[0] for r in GOOD[:3]]
    for r in rows:
        assert video_io.read_video(os.path.join(out, r["syn_video"]), num_frames=9).shape == (9, 32, 64, 3)
    assert partial[0] not in final_mp4s(out)  # never listed nor counted as a video
    assert_same_bytes(first_run[0].out_dir, out, rows)  # the killed-and-resumed run wrote the uninterrupted one's bytes


def test_sharding_and_seeds_do_not_depend_on_the_number_of_ranks(tmp_path, tiny_pipe, monkeypatch):
    """The same rows with 1 process and with 2 simulated ranks (rank 1 first, then rank 0, which
    writes the CSV): each rank renders its share, every row gets the same seed and file name.
    G is replaced by a stand-in that paints the seed, so the test reads which seed each video got."""
    path = write_rows(tmp_path / "in.csv", GOOD)
    rendered = []

    def paint_seed(pipe, prompts, seeds, settings):
        rendered.extend(prompts)
        return [np.full((9, 32, 64, 3), seed % 251, dtype=np.uint8) for seed in seeds]
    monkeypatch.setattr(gen, "generate", paint_seed)
    run(args_for(path, tmp_path / "one", tiny_pipe))
    assert rendered == [r[2] for r in GOOD]
    rendered.clear()
    for rank in (1, 0):
        monkeypatch.setenv("RANK", str(rank))  # print0 / progress read RANK
        monkeypatch.setattr(runs, "setup_distributed", lambda **_: runs.Dist(rank, rank, 2, "cpu", rank == 0))
        run(args_for(path, tmp_path / "two", tiny_pipe))
    assert rendered == [GOOD[1][2], GOOD[3][2], GOOD[0][2], GOOD[2][2]]  # rank 1: rows 1, 3; rank 0: rows 0, 2
    one, two = read_out(tmp_path / "one"), read_out(tmp_path / "two")
    assert one == two and len({r["seed"] for r in one}) == 4
    for r in two:
        painted = video_io.read_video(os.path.join(tmp_path / "two", r["syn_video"]), num_frames=9)
        assert abs(painted.mean() - int(r["seed"]) % 251) < 2  # the video was drawn with the CSV's seed


DIE_WRITING = """
import os, runpy, signal, sys
sys.path[:0] = [{root!r}]
if os.environ.get("RANK", "1") == "1":  # rank 1, or a process of its own: kill -9 as it starts to write a video
    from synvita import render_writer
    render_writer.write_video = lambda *args, **kwargs: os.kill(os.getpid(), signal.SIGKILL)
sys.argv[0] = {script!r}
runpy.run_path({script!r}, run_name="__main__")
"""


def test_two_torchrun_nodes_match_one_process_after_a_lost_node(tmp_path, tiny_pipe, first_run):
    """Issue 36: two torchrun "nodes" (README's local two-node command: c10d rendezvous, one process
    each, gloo on the CPU) over the rows of the first run. Item 2 in 01, where ranks meet only through
    files: node 2's worker (rank 1) is killed (SIGKILL) before its video is written. Node 1's torchrun,
    which hosts the rendezvous, does not see it, so rank 0 waits, and stops after --dist_timeout seconds
    with no progress, naming the missing video. The same command again renders only that video (rank 0's
    are on disk): the one process's bytes. (Where the lost node hosts the rendezvous, the other's
    torchrun stops at once.) One test for both: each two-node launch costs seconds of start-up."""
    args, _ = first_run
    out, script = tmp_path / "two", tmp_path / "die_writing.py"
    script.write_text(DIE_WRITING.format(root=ROOT, script=os.path.join(ROOT, "01_generate.py")))
    # 3 s without a video: enough for the relaunch, where rank 1's video comes ~0.3 s after rank 0 starts to wait
    flags = ["--input_csv", args.input_csv, "--out_dir", out, "--pipeline", tiny_pipe, "--dist_timeout", "3",
             *[f"--{k}={v}" for k, v in TINY.items()]]
    killed = torchrun_nodes(script, *flags, host_first=True)  # the lost node is not the rendezvous' host
    assert [node.returncode for node in killed] == [1, 1]  # both nodes end, neither hangs
    assert "rank 0: 2 of its 2 rows to render" in killed[0].stdout  # rows 0 and 2 of 3; rank 1 (node 2) had row 1
    stderr = "".join(node.stderr for node in killed)
    assert "exitcode  : -9" in stderr and "error: rank 0 waited 3 s (--dist_timeout) with no progress from the " \
        f"other ranks for 1 file, e.g. {out}/videos/v2-" in stderr
    assert len(final_mp4s(out)) == 2 and not (out / "generated.csv").exists()  # rank 0's videos are on disk
    printed = assert_ran(torchrun_nodes(os.path.join(ROOT, "01_generate.py"), *flags))
    assert "rank 0: 0 of its 2 rows to render, 2 on disk already" in printed
    one, two = read_out(args.out_dir), read_out(out)
    assert one == two
    assert_same_bytes(args.out_dir, out, one)  # the same rows, the same files, byte for byte
    assert_same_bytes(args.out_dir, out, [dict(syn_video="generated_skipped.csv")])  # rank 0's list of bad rows too


def test_three_shards_in_any_order_one_killed_then_the_merge_give_the_same_bytes(tmp_path, tiny_pipe, first_run):
    """Issue 36 item 3: --shard i/n, preemptible single-GPU jobs with no process group: shards 2, 0
    (a process of its own, killed with SIGKILL as it writes its video), 1, then 0 again; each renders
    its call alone and resumes alone; the same flags without --shard then find every video on disk,
    load no G and write generated.csv: the one process's bytes."""
    args, _ = first_run
    out, script = tmp_path / "shards", tmp_path / "die_writing.py"
    printed = run(args_for(args.input_csv, out, tiny_pipe, shard="2/3"))
    assert "shard 2/3: 1 of its 1 row to render" in printed and "shard 2/3: done; 1 of 3 videos on disk" in printed
    script.write_text(DIE_WRITING.format(root=ROOT, script=os.path.join(ROOT, "01_generate.py")))
    killed = subprocess.run([sys.executable, script, "--input_csv", args.input_csv, "--out_dir", out, "--pipeline",
                             tiny_pipe, "--shard", "0/3", *[f"--{k}={v}" for k, v in TINY.items()]],
                            env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9 and len(final_mp4s(out)) == 1, killed.stderr[-3000:]
    printed = run(args_for(args.input_csv, out, tiny_pipe, shard="1/3"))  # while shard 0 waits to be run again
    assert "shard 1/3: done; 2 of 3 videos on disk. Once every shard is done, the same flags without --shard" in printed
    printed = run(args_for(args.input_csv, out, tiny_pipe, shard="0/3"))  # the killed shard, again
    assert "shard 0/3: 1 of its 1 row to render" in printed
    assert "Every shard is done: the same flags without --shard write generated.csv" in printed
    assert not (out / "generated.csv").exists()  # a shard never writes it: one writer, the merge
    assert "rank 0: 0 of its 3 rows to render, 3 on disk already" in run(args_for(args.input_csv, out, tiny_pipe))
    assert (out / "generated.csv").read_bytes() == open(os.path.join(args.out_dir, "generated.csv"), "rb").read()
    assert_same_bytes(args.out_dir, out, read_out(out) + [dict(syn_video="generated_skipped.csv")])  # the merge's


def assert_same_bytes(dir_a, dir_b, rows):
    """Each row's mp4 in two output folders is the same file, byte for byte (video_io.write_video)."""
    for r in rows:
        a, b = (open(os.path.join(d, r["syn_video"]), "rb").read() for d in (dir_a, dir_b))
        assert a == b, f"{r['syn_video']} differs between {dir_a} and {dir_b}"


def test_settings_come_from_the_flags_or_the_pipeline_defaults(tmp_path):
    with pytest.raises(common.UserError, match=f"--pipeline {tmp_path}/no-such-model: no such folder"):
        gen.resolve_settings(gen.Args(pipeline=str(tmp_path / "no-such-model"), **TINY))  # issue 14 item 16
    (tmp_path / "model_index.json").write_text('{"_class_name": "SomeNewVideoPipeline"}')
    with pytest.raises(ValueError, match="no defaults for SomeNewVideoPipeline .*; pass --guidance_scale --fps$"):
        gen.resolve_settings(gen.Args(pipeline=str(tmp_path), **TINY))
    name, settings = gen.resolve_settings(gen.Args(pipeline=str(tmp_path), guidance_scale=4.0, fps=12, **TINY))
    assert name == "SomeNewVideoPipeline" and settings == dict(TINY, guidance_scale=4.0, fps=12)
    (tmp_path / "model_index.json").write_text('{"_class_name": "CogVideoXPipeline"}')
    _, settings = gen.resolve_settings(gen.Args(pipeline=str(tmp_path), num_frames=17))  # the paper's, but 17 frames
    assert settings == dict(num_inference_steps=50, guidance_scale=6.0, height=480, width=720, num_frames=17, fps=8)


def test_a_frame_count_the_vae_cannot_make_is_refused(tmp_path, tiny_pipe):
    path = write_rows(tmp_path / "in.csv", GOOD[:1])
    with pytest.raises(common.UserError, match="--num_frames 10: CogVideoXPipeline renders 1 \\+ a multiple of 4 frames, e.g. 9"):
        gen.main(args_for(path, tmp_path / "out", tiny_pipe, num_frames=10))
    assert final_mp4s(tmp_path / "out") == []
    # issue 26: no settings record was left to refuse the corrected rerun as "made with other settings"
    assert not (tmp_path / "out" / "resume.json").exists()
    run(args_for(path, tmp_path / "out", tiny_pipe, num_frames=9))
    assert len(final_mp4s(tmp_path / "out")) == 1


def test_ltx_videos_frame_count_is_checked_too(tmp_path):
    """LTX-Video names its VAE's time stride vae_temporal_compression_ratio (8), not vae_scale_factor_temporal."""
    args = gen.Args(pipeline=tiny_generate.tiny_ltx(str(tmp_path)), height=64, width=64, num_frames=10)
    with pytest.raises(ValueError, match="--num_frames 10: LTXPipeline renders 1 \\+ a multiple of 8 frames, e.g. 9"):
        generator.load_generator(args, runs.setup_distributed(), gen.resolve_settings(args)[1])


def test_wan_keeps_its_vae_in_float32_and_renders(tmp_path):
    """As Wan 2.1's model card loads it: the VAE in float32, the rest in the chosen dtype."""
    args = gen.Args(pipeline=tiny_generate.tiny_wan(str(tmp_path)), dtype="bfloat16", height=32, width=32,
                    num_frames=9, num_inference_steps=1)
    settings = gen.resolve_settings(args)[1]
    pipe = generator.load_generator(args, runs.setup_distributed(), settings)
    assert (pipe.vae.dtype, pipe.transformer.dtype, pipe.text_encoder.dtype) == (torch.float32,) + (torch.bfloat16,) * 2
    assert gen.generate(pipe, ["A dog runs to the left."], [0], settings)[0].shape == (9, 32, 32, 3)


# ---- issue 26: cells that mean the same, captions G cannot read whole, counts that say what happened ----
def paint(monkeypatch):
    """G replaced by a stand-in that paints a constant video (the tests below are about rows, not frames)."""
    monkeypatch.setattr(gen, "generate", lambda pipe, prompts, seeds, settings: [np.full((9, 32, 64, 3), 9, np.uint8)] * len(prompts))


def test_split_cells_are_read_without_case_or_spaces_and_the_others_counted(tmp_path, tiny_pipe, monkeypatch):
    paint(monkeypatch)
    rows = [GOOD[0][:4] + ["Train"], GOOD[1][:4] + [" train"], GOOD[2][:4] + ["test"], GOOD[3][:4] + ["val"]]
    path, out = write_rows(tmp_path / "in.csv", rows), tmp_path / "out"
    printed = run(args_for(path, out, tiny_pipe))
    assert [r["videopath"] for r in read_out(out)] == ["act/v1.mp4", "act/v2.mp4"]  # Train and ' train' are train
    assert f"{path}: 2 row(s) of other splits left out (--split 'train'" in printed
    assert "2 rows to render" in printed and "0 bad rows skipped, 2 rows of other splits left out (--split)" in printed
    assert "rank 0: 2 of its 2 rows to render\n" in printed  # none is on disk: nothing says otherwise
    assert printed.rstrip().endswith("generated.csv: 2 rows; 0 bad rows skipped, 2 rows of other splits left out (--split)")
    record = json.loads((out / "generate_args.json").read_text())
    assert (record["rows"], record["skipped"], record["other_splits"], record["truncated"]) == (2, 0, 2, [])
    assert "rank 0: 0 of its 2 rows to render, 2 on disk already" in run(args_for(path, out, tiny_pipe))


def test_a_neg_caption_past_the_text_encoder_is_truncated_named_and_counted(tmp_path, tiny_pipe):
    """CogVideoX's T5 encoder takes 226 tokens (the pipeline's max_sequence_length): a longer t^s is
    rendered from its first 226 tokens, as diffusers does, and the row is named by file:line, counted
    in the summary and in generate_args.json (diffusers' own warning names no row)."""
    long = "A woman rides a brown horse along the beach. " * 40  # ~400 tokens of the tiny T5 tokenizer
    assert len(tiny_generate.t5_tokenizer()(long)["input_ids"]) > 226
    path, out = write_rows(tmp_path / "in.csv", [GOOD[0], [*GOOD[1][:2], long, "action", "train"]]), tmp_path / "out"
    printed = run(args_for(path, out, tiny_pipe))
    assert (f"{path}: 1 neg_caption(s) longer than the 226 tokens CogVideoXPipeline's text encoder takes, rendered "
            f"from their first 226 tokens: line(s) 3") in printed
    assert printed.count("1 neg_caption truncated to G's text encoder") == 2  # the plan and the summary
    assert json.loads((out / "generate_args.json").read_text())["truncated"] == [f"{path}:3"]
    assert len(final_mp4s(out)) == 2  # rendered, not skipped


@pytest.mark.parametrize("argv, needles", [
    (["--limit", "-1"], ["--limit -1: give a number >= 0"]),  # keep[:-1] would drop the last row
    (["--fps", "-1"], ["--fps -1: give a number >= 0"]),  # issue 37 item 3: PyAV's error mid-run, and a record left
    (["--pipeline_kwargs", "{noise: 0}"], ["--pipeline_kwargs '{noise: 0}': not JSON"]),
    (["--pipeline", "toyworld.nowhere:Generator"], ["--pipeline toyworld.nowhere:Generator", "toyworld.nowhere"]),
    (["--misalignment", "acton"], ["in.csv: no usable row with --split 'train' and --misalignment ['acton']"]),
])
def test_a_users_mistake_is_one_line_and_writes_nothing(argv, needles, tmp_path):
    """Every error of 01 that is the user's (a flag, a file) is `error: ...` with exit status 2, no
    traceback, and the output folder is not created."""
    path = write_rows(tmp_path / "in.csv", GOOD[:2])
    pipeline = [] if "--pipeline" in argv else ["--pipeline", "toyworld.generator:ToyGenerator"]
    done = run_main("01_generate.py", "--input_csv", path, "--out_dir", tmp_path / "out", *pipeline, *argv)
    assert_user_error(done, *needles)
    assert not (tmp_path / "out").exists()


# ---- issue 27: caches, batching and the memory options of 01 ----
CACHED = dict(num_inference_steps=6, cache="taylorseer")  # full steps 0-2 and 4, forecast steps 3 and 5
# MagCache's ratios for 6 steps (a checkpoint's own come from a '{"calibrate": true}' run); at threshold 0.5 it
# reuses the last residual at most steps after the first
MAG_RATIOS = '{"mag_ratios": [1.0, 1.0, 0.99, 0.99, 0.98, 0.97], "threshold": 0.5}'


def mp4_bytes(out_dir):
    """{syn_video: the mp4's bytes} of a finished run."""
    return {r["syn_video"]: open(os.path.join(out_dir, r["syn_video"]), "rb").read() for r in read_out(out_dir)}


def test_a_cached_run_is_recorded_reproducible_and_resumes_to_the_same_bytes(tmp_path, tiny_pipe):
    """--cache and its settings are in resume.json and a rerun with another cache (or other settings
    of it) is refused; a cached run gives the same bytes twice, and a resumed one too: a row rendered
    first after the resume was rendered after another row before, so no cache state crosses rows."""
    path = write_rows(tmp_path / "in.csv", GOOD[:3])
    run(args_for(path, tmp_path / "a", tiny_pipe, **CACHED))
    record = json.loads((tmp_path / "a" / "resume.json").read_text())
    assert record["cache"] == "taylorseer" and record["cache_settings"]["cache_interval"] == 5
    with pytest.raises(common.UserError, match=r"cache: 'taylorseer' then, 'pab' now"):
        run(args_for(path, tmp_path / "a", tiny_pipe, **dict(CACHED, cache="pab")))
    run(args_for(path, tmp_path / "none", tiny_pipe, num_inference_steps=6))  # the same, without a cache
    with pytest.raises(common.UserError, match=r"cache: None then, 'taylorseer' now"):
        run(args_for(path, tmp_path / "none", tiny_pipe, **CACHED))
    with pytest.raises(common.UserError, match=r"cache_settings: .*'cache_interval': 5.* then, .*'cache_interval': 2"):
        run(args_for(path, tmp_path / "a", tiny_pipe, cache_kwargs='{"cache_interval": 2}', **CACHED))
    first = mp4_bytes(tmp_path / "a")
    assert first != mp4_bytes(tmp_path / "none")  # the cache moved the pixels (steps 3 and 5 forecast)
    run(args_for(path, tmp_path / "b", tiny_pipe, **CACHED))
    assert mp4_bytes(tmp_path / "b") == first  # same seed, same video
    os.remove(os.path.join(tmp_path / "b", read_out(tmp_path / "b")[1]["syn_video"]))  # as a kill would leave it
    assert "rank 0: 1 of its 3 rows to render, 2 on disk already" in run(args_for(path, tmp_path / "b", tiny_pipe, **CACHED))
    assert mp4_bytes(tmp_path / "b") == first


@pytest.mark.parametrize("cache", ["none", "taylorseer", "magcache"])
def test_a_rows_call_of_g_does_not_depend_on_the_gpu_count_or_a_rerun(tmp_path, tiny_pipe, cache, monkeypatch):
    """--prompts_per_call 2: G renders rows 1-2 in one call and row 3 alone, whatever the number of
    ranks, and again after a kill: the same bytes. One torch.Generator per prompt, seeded with the
    row's seed; but the shape of a batch can change a kernel's rounding (on an AVX-512 CPU, row 2
    rendered beside row 1 gave other bytes than rendered alone), so the calls are fixed by the rows'
    places and the batching is recorded: a rerun with another is refused."""
    path = write_rows(tmp_path / "in.csv", GOOD[:3])
    batched = dict(CACHED, cache=cache, prompts_per_call=2, cache_kwargs=MAG_RATIOS if cache == "magcache" else "")
    run(args_for(path, tmp_path / "one", tiny_pipe, **batched))
    one = mp4_bytes(tmp_path / "one")
    # two ranks, which meet only through files in 01: rank 1 renders the second call (row 3), then
    # rank 0 the first (rows 1-2) and writes the CSV; the same as torchrun runs them, without its start-up
    for rank in (1, 0):
        monkeypatch.setattr(runs, "setup_distributed", lambda rank=rank, **_: runs.Dist(rank, rank, 2, "cpu", rank == 0))
        printed = run(args_for(path, tmp_path / "two", tiny_pipe, **batched))
    assert "rank 0: 2 of its 2 rows to render" in printed and mp4_bytes(tmp_path / "two") == one
    # a kill that left row 2's video unwritten: the rerun renders rows 1-2 together again, writes row 2 only
    monkeypatch.setattr(runs, "setup_distributed", runs.Dist)
    os.remove(tmp_path / "one" / read_out(tmp_path / "one")[1]["syn_video"])
    assert "rank 0: 1 of its 3 rows to render, 2 on disk already" in run(args_for(path, tmp_path / "one", tiny_pipe, **batched))
    assert mp4_bytes(tmp_path / "one") == one
    with pytest.raises(common.UserError, match=r"prompts_per_call: 2 then, None now"):
        run(args_for(path, tmp_path / "one", tiny_pipe, **dict(batched, prompts_per_call=1)))


def test_cache_kwargs_become_the_diffusers_config():
    """Lists become the tuples the config wants, dtype names torch dtypes; the step count and the
    timestep come from 01, not from --cache_kwargs."""
    args = gen.Args(cache="pab", cache_kwargs='{"spatial_attention_timestep_skip_range": [50, 900]}')
    config, settings = generator.cache_config(args, 50, lambda: 7)
    assert config.spatial_attention_timestep_skip_range == (50, 900) and config.current_timestep_callback() == 7
    assert settings == {"spatial_attention_block_skip_range": 2, "spatial_attention_timestep_skip_range": [50, 900]}
    config, _ = generator.cache_config(gen.Args(cache="taylorseer", cache_kwargs='{"taylor_factors_dtype": "float32"}'), 50, None)
    assert config.taylor_factors_dtype == torch.float32
    config, _ = generator.cache_config(gen.Args(cache="magcache", cache_kwargs='{"mag_ratios": [1.0, 0.9]}'), 4, None)
    assert config.num_inference_steps == 4 and len(config.mag_ratios) == 4  # spread over the 4 steps
    assert generator.cache_config(gen.Args(), 50, None) == (None, {})


@pytest.mark.parametrize("argv, needles", [
    (["--cache", "taylorseer", "--cache_kwargs", "{interval: 4}"], ["--cache_kwargs '{interval: 4}': not JSON"]),
    (["--cache", "taylorseer", "--cache_kwargs", '{"interval": 4}'], ["TaylorSeerCacheConfig takes", "not ['interval']"]),
    (["--cache", "pab", "--cache_kwargs", "[2]"], ["PyramidAttentionBroadcastConfig takes a JSON object of"]),
    (["--cache", "magcache", "--cache_kwargs", '{"num_inference_steps": 9}'], ["not ['num_inference_steps']"]),
    (["--cache", "magcache"], ["--cache magcache --cache_kwargs '': ", "mag_ratios"]),
    (["--cache", "first_block", "--prompts_per_call", "2"], ["--cache first_block decides from all the rows"]),
    (["--prompts_per_call", "0"], ["--prompts_per_call 0: give a number >= 1"]),
    # issue 37 item 2: each value against its diffusers config field, before any work (not mid-run: a
    # ZeroDivisionError at the first step, a TypeError, PAB's range read as an int)
    (["--cache", "taylorseer", "--cache_kwargs", '{"cache_interval": 0}'],
     ["TaylorSeerCacheConfig's cache_interval takes an integer >= 1, not 0"]),
    (["--cache", "taylorseer", "--cache_kwargs", '{"cache_interval": "5"}'], ["cache_interval takes an integer >= 1, not \"5\""]),
    (["--cache", "pab", "--cache_kwargs", '{"spatial_attention_timestep_skip_range": 100}'],
     ["PyramidAttentionBroadcastConfig's spatial_attention_timestep_skip_range takes [low, high]: two numbers, low <= high, not 100"]),
    (["--cache", "pab", "--cache_kwargs", '{"spatial_attention_block_skip_range": 0}'], ["block_skip_range takes an integer >= 1"]),
    (["--cache", "taylorseer", "--cache_kwargs", '{"use_lite_mode": "yes"}'], ["use_lite_mode takes true or false"]),
    (["--cache", "taylorseer", "--cache_kwargs", '{"taylor_factors_dtype": "float12"}'], ["taylor_factors_dtype takes a torch dtype's"]),
    (["--cache", "taylorseer", "--cache_kwargs", '{"cache_identifiers": ["blocks.(ff"]}'], ["a list of regular expressions"]),
    (["--cache", "fastercache", "--cache_kwargs", '{"tensor_format": "BSC"}'], ["tensor_format takes one of ['BCFHW', 'BFCHW', 'BCHW']"]),
    (["--cache", "magcache", "--cache_kwargs", '{"mag_ratios": []}'], ["mag_ratios takes a list of numbers > 0, not []"]),
    (["--cache", "magcache", "--cache_kwargs", '{"threshold": NaN, "mag_ratios": [1]}'], ["threshold takes a number >= 0, not NaN"]),
    (["--prompts_per_call", "2"], ["toyworld.generator:ToyGenerator renders one prompt a call"]),
])
def test_a_bad_cache_or_batch_flag_is_one_line_before_any_work(argv, needles, tmp_path):
    path = write_rows(tmp_path / "in.csv", GOOD[:2])
    done = run_main("01_generate.py", "--input_csv", path, "--out_dir", tmp_path / "out",
                   "--pipeline", "toyworld.generator:ToyGenerator", *argv)
    assert_user_error(done, *needles)
    assert not (tmp_path / "out").exists()


def test_a_misspelt_cache_name_is_refused_by_argparse(tmp_path):
    done = run_main("01_generate.py", "--input_csv", tmp_path / "in.csv", "--cache", "taylorsear")
    assert done.returncode == 2 and "invalid choice: 'taylorsear'" in done.stderr


def test_fastercache_is_refused_where_it_cannot_run(tmp_path):
    """FasterCache splits CFG's two halves out of one batch of frames: Wan calls them apart, LTX
    batches tokens. Refused with G's settings, before G loads."""
    args = gen.Args(pipeline=tiny_generate.tiny_wan(str(tmp_path)), cache="fastercache")
    with pytest.raises(common.UserError, match="--cache fastercache runs on CogVideoXPipeline only, not WanPipeline"):
        gen.resolve_settings(args)


# ---- issue 35: the paper's other two generators, from folders laid out as their original releases ----
@pytest.mark.parametrize("builder", ["tiny_lavie", "tiny_videocrafter2"])
def test_lavie_and_videocrafter2_render_through_01_the_same_bytes_twice(builder, tmp_path):
    """01 recognises the release folder (no model_index.json), loads the rebuilt pipeline, renders every
    row, and a second run writes the same mp4 bytes; a cache is refused (their denoiser is a UNet)."""
    folder = getattr(importlib.import_module(builder), builder)(str(tmp_path / "g"))
    path = write_rows(tmp_path / "in.csv", GOOD[:2])
    size = dict(height=32, width=64, num_frames=4, num_inference_steps=2)
    for out in ("one", "two"):
        run(gen.Args(input_csv=path, out_dir=str(tmp_path / out), pipeline=folder, prompts_per_call=2, **size))
    name = json.loads((tmp_path / "one" / "generate_args.json").read_text())["pipeline_class"]
    assert name == {"tiny_lavie": "LaViePipeline", "tiny_videocrafter2": "VideoCrafter2Pipeline"}[builder]
    one = mp4_bytes(tmp_path / "one")
    assert len(one) == 2 and one == mp4_bytes(tmp_path / "two")
    with pytest.raises(common.UserError, match="denoises with a UNet"):
        run(gen.Args(input_csv=path, out_dir=str(tmp_path / "cached"), pipeline=folder, cache="taylorseer", **size))


# ---- issue 37: bad input, round 3 ----
def test_a_batched_call_gives_the_same_bytes_whatever_the_cpu_threads(tmp_path, tiny_pipe):
    """Item 1: `--cache magcache --prompts_per_call 2` under torchrun (its workers get OMP_NUM_THREADS=1)
    and under plain python (every core) wrote other bytes for a row: not MagCache (its skips follow the
    step index and its ratios, and its state is reset after each call: the rank test above passes), but
    the VAE decoding a call's videos as one batch, whose rounding on the CPU follows the thread count.
    Each video is now decoded alone, as in a one-prompt call: the same bytes with 1 thread as with 2."""
    path = write_rows(tmp_path / "in.csv", GOOD[:2])  # one call of G: rows 1-2
    batched = dict(CACHED, cache="magcache", cache_kwargs=MAG_RATIOS, prompts_per_call=2)
    threads = torch.get_num_threads()
    try:
        for n in (2, 1):
            torch.set_num_threads(n)
            run(args_for(path, tmp_path / f"threads{n}", tiny_pipe, **batched))
    finally:
        torch.set_num_threads(threads)
    assert mp4_bytes(tmp_path / "threads1") == mp4_bytes(tmp_path / "threads2")


@pytest.mark.parametrize("size, needles", [
    (["--height", "36"], ["--height 36 --width 64: CogVideoXPipeline renders heights and widths that are multiples "
                          "of 16, e.g. 32x64"]),  # diffusers' ValueError (not a multiple of 8) in G's first call
    (["--height", "40"], ["--height 40 --width 64", "multiples of 16"]),  # 8 x the transformer's patch of 2: a RuntimeError
])
def test_a_size_g_cannot_render_is_one_line_and_leaves_no_record(size, needles, tmp_path, tiny_pipe):
    """Item 3: a height or width that is not a multiple of G's VAE factor times its transformer's patch
    stops as G loads, before resume.json (which refused the corrected command) or any video is written."""
    path = write_rows(tmp_path / "in.csv", GOOD[:1])
    flags = [f"--{k}={v}" for k, v in TINY.items() if k != "height"]
    done = run_main("01_generate.py", "--input_csv", path, "--out_dir", tmp_path / "out", "--pipeline", tiny_pipe,
                    *flags, *size)
    assert_user_error(done, *needles)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("builder, height, multiple", [
    ("tiny_ltx", 48, 32), ("tiny_wan", 40, 16), ("tiny_lavie", 36, 8), ("tiny_videocrafter2", 40, 16)])
def test_each_generators_own_size_multiple_is_checked_as_it_loads(builder, height, multiple, tmp_path):
    """LTX-Video: its VAE's 32 (x a patch of 1); Wan: 8 x 2; LaVie: its own check's 8; VideoCrafter2: its
    VAE's 8, halved by its UNet's levels: each the size that G's first call would refuse (a ValueError)."""
    module = tiny_generate if builder in ("tiny_ltx", "tiny_wan") else importlib.import_module(builder)
    args = gen.Args(pipeline=getattr(module, builder)(str(tmp_path / "g")), height=height, width=64, num_frames=9,
                    guidance_scale=2.0, fps=8)
    settings = gen.resolve_settings(args)[1]
    with pytest.raises(common.UserError, match=f"--height {height} --width 64: .* multiples of {multiple}, "):
        generator.load_generator(args, runs.setup_distributed(), settings)


def test_a_first_run_stopped_in_gs_first_call_does_not_refuse_the_corrected_command(tmp_path):
    """Item 3: a setting that only G's first call refuses (a module:Class G has no size to check
    before: the toy G draws one size) is one line; resume.json was written, but no video of that run
    is on disk, so the corrected command replaces the record and runs (it was "height: 65 then")."""
    toy = [["v1.mp4", "three blue triangles move left", "three blue triangles move right", "action", "train"],
           ["v2.mp4", "a blue triangle moves left above a green circle", "a blue triangle moves left below a green "
            "circle", "relation", "train"]]  # the toy world's captions: the only ones its G draws
    flags = ["--input_csv", write_rows(tmp_path / "in.csv", toy), "--out_dir", tmp_path / "out",
             "--pipeline", "toyworld.generator:ToyGenerator"]
    assert_user_error(run_main("01_generate.py", *flags, "--height", "65"), "ToyGenerator: ", "not 8 of 65x32",
                      "(G's call with {")
    assert json.loads((tmp_path / "out" / "resume.json").read_text())["height"] == 65 and not final_mp4s(tmp_path / "out")
    done = run_main("01_generate.py", *flags)
    assert done.returncode == 0, done.stderr[-3000:]
    assert len(final_mp4s(tmp_path / "out")) == 2
    # once a video is on disk, other settings are refused again: those videos are protected
    assert_user_error(run_main("01_generate.py", *flags, "--seed", "1"), "resume.json: the work here was made with "
                      "other settings (seed: 0 then, 1 now)")


def test_an_output_that_is_the_input_or_under_a_file_is_refused_before_any_work(tmp_path):
    """Item 5 (disk.check_outputs): generated.csv given back as --input_csv (by any name: here a symlink)
    would be replaced by the run that reads it; an --out_dir through a file cannot be made. Each is one
    line before anything is read or written."""
    out = tmp_path / "out"
    out.mkdir()
    path = write_rows(out / "generated.csv", GOOD[:2])
    (tmp_path / "link.csv").symlink_to(path)
    before = open(path, "rb").read()
    toy = ["--pipeline", "toyworld.generator:ToyGenerator"]
    done = run_main("01_generate.py", "--input_csv", tmp_path / "link.csv", "--out_dir", out, *toy)
    assert_user_error(done, f"--out_dir (generated.csv) {out}/generated.csv is --input_csv {tmp_path}/link.csv")
    assert open(path, "rb").read() == before and sorted(os.listdir(out)) == ["generated.csv"]
    done = run_main("01_generate.py", "--input_csv", path, "--out_dir", out / "generated.csv" / "run", *toy)
    assert_user_error(done, f"--out_dir {out}/generated.csv/run: {out}/generated.csv is a file, not a folder")
