"""The rows of 01_generate.py (§4): the flags checked before any work, which triplets (V^r, t^r, t^s)
to render and which bad rows were skipped (generated_skipped.csv), each row's video name (its seed is
runs.example_seed's), the settings-checked resume record, which videos are on disk already, the calls
of G (--prompts_per_call rows each) and whose they are (a rank's, or --shard i/n's), and rank 0
waiting for the other ranks' videos."""
import glob
import hashlib
import json
import os
import re

from synvita import generator
from synvita.disk import check_outputs, file_hash, keep_split, read_csv, write_csv
from synvita.runs import Dist, UserError, plural, print0, wait_for_files

REQUIRED = ("videopath", "caption", "neg_caption", "misalignment")  # V^r, t^r, t^s and the type of t^s
TEXTS = ("videopath", "caption", "neg_caption")  # must not be empty
# what 01 writes in --out_dir beside videos/ (each refused as an input's path before any work)
OUTPUTS = ("generated.csv", "generated_skipped.csv", "generate_args.json", "resume.json")
SKIPPED_COLUMNS = ["file", "line", "videopath", "reason"]  # as 03's skipped.csv and 04's <task>_skipped.csv


def check_flags(args):
    """The flags that argparse cannot check, before any work: a UserError (`error: ...`, exit 2) names each."""
    if not args.input_csv:  # no default: §4 needs the real triplets
        raise UserError("pass --input_csv, a CSV with columns " + ", ".join(REQUIRED))
    # an output that is the input (generated.csv read back as --input_csv would be replaced), or a
    # --out_dir through a file; numbers (--limit -1, --prompts_per_call 0) were checked with the flags
    check_outputs({"--out_dir": args.out_dir, **{f"--out_dir ({name})": os.path.join(args.out_dir, name)
                                                for name in OUTPUTS}}, {"--input_csv": args.input_csv})
    try:  # parsed again when G loads: a typo must stop the run before rows are read, not after
        json.loads(args.pipeline_kwargs or "{}")
    except json.JSONDecodeError as e:
        raise UserError(f"--pipeline_kwargs {args.pipeline_kwargs!r}: not JSON ({e})") from None
    if args.prompts_per_call > 1 and args.cache == "first_block":  # its skip test reads the whole batch
        raise UserError("--cache first_block decides from all the rows of a call: use --prompts_per_call 1")
    generator.cache_config(args, args.num_inference_steps or 50, lambda: 0)  # its JSON, keys and values, checked here
    if generator.python_class(args.pipeline) and (args.cache != "none" or args.compile or args.prompts_per_call > 1):
        # a stand-in G (python_class) has no transformer to cache or compile and takes one t^s a call
        raise UserError(f"--pipeline {args.pipeline} renders one prompt a call, without a transformer: "
                        f"no --cache, --compile or --prompts_per_call")


# ---- §4's input: the triplets to render ----
def read(args):
    """§4's triplets (V^r, t^r = caption, t^s = neg_caption) of --input_csv to render -> (rows: those
    of --split, todo: the selected ones in file order, their lines in the file, counts: {skipped,
    not_selected, other_splits}, skipped: each bad row once, as generated_skipped.csv lists it). A
    missing column, a non-UTF-8 byte or a header-only file stops the run, naming the file; bad rows
    are named by line and counted (disk.read_csv, select_rows)."""
    every = read_csv(args.input_csv, required=REQUIRED, texts=TEXTS)  # bad rows named by line, counted
    rows = keep_split(every, args.split, args.input_csv)  # `Train`, ` train`: train; the others counted
    todo, lines, twice, not_selected = select_rows(rows, args)  # a (videopath, t^s) twice, --misalignment, --limit
    # the reader's bad rows (it keeps no cell of them) and the rows of a (videopath, t^s) seen before,
    # in file order: the summary's count is this list's length
    skipped = sorted([dict(file=args.input_csv, line=line, videopath="", reason=problem)
                      for problem, bad in rows.skipped.items() for line in bad] + twice, key=lambda r: r["line"])
    # counted apart from the bad rows: another split is not a fault of the file
    counts = {"skipped": len(skipped), "not_selected": not_selected, "other_splits": len(every) - len(rows)}
    return rows, todo, lines, counts, skipped  # rows too: generated.csv keeps the input's columns in its order


def select_rows(rows, args):
    """The rows to generate, in file order, their lines in the file, the rows skipped here (as
    generated_skipped.csv lists them) and the number not selected (of other --misalignment types
    or past --limit).

    rows: disk.read_csv's, which already skipped (named by line, counted) rows with a wrong
    number of fields, an empty videopath / caption / neg_caption, and exact duplicates, and kept
    those of --split (disk.keep_split). Here a row with the same (videopath, neg_caption) as an
    earlier one (same identity = same seed = same video) is skipped too. A --misalignment that
    selects no row is an error."""
    keep, lines, first_line, twice = [], [], {}, []  # first_line: (videopath, neg_caption) -> its line
    wanted = {kind.strip().lower() for kind in args.misalignment}  # a type is read without case or spaces
    for line, row in zip(rows.lines, rows):
        if args.misalignment and row["misalignment"].strip().lower() not in wanted:  # "Action " is action
            continue  # not asked for
        if (first := first_line.get((row["videopath"], row["neg_caption"]))) is not None:
            twice.append(dict(file=args.input_csv, line=line, videopath=row["videopath"],
                              reason=f"same videopath and neg_caption as line {first}"))
            continue
        first_line[row["videopath"], row["neg_caption"]] = line
        keep.append(row)
        lines.append(line)
    if twice:
        print0(f"{args.input_csv}: {len(twice)} row(s) skipped, same videopath and neg_caption as an earlier "
               f"row: line(s) {', '.join(str(r['line']) for r in twice)}")
    # a misspelt --misalignment is named, with the types the file has
    types = sorted({r["misalignment"] for r in rows})
    for kind in sorted(wanted - {r["misalignment"].strip().lower() for r in keep}):
        print0(f"--misalignment {kind!r}: no usable row of this type in {args.input_csv}; its types: {types}")
    if not keep:
        raise UserError(f"{args.input_csv}: no usable row with --split {args.split!r} and --misalignment "
                        f"{args.misalignment}; its types: {types}")
    # --limit comes after the filters: the first N rows of what was asked for
    n = args.limit or len(keep)
    return keep[:n], lines[:n], twice, len(rows) - len(twice) - len(keep[:n])


def write_skipped(out_dir, skipped):
    """<out_dir>/generated_skipped.csv: each bad row of --input_csv once (file, line, videopath, reason),
    in file order, header only when none was (the same bytes on a rerun: written whole, atomically)."""
    path = os.path.join(out_dir, "generated_skipped.csv")
    write_csv(path, skipped, SKIPPED_COLUMNS)
    return path


def summary(counts):
    """What was left out or changed, in one clause: the run's summary lines and generate_args.json agree."""
    parts = [f"{plural(counts['skipped'], 'bad row')} skipped"]  # always said, even 0: the input was checked
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
    # the real video's file name, any character a file system may refuse made "_"
    stem = re.sub(r"[^\w-]+", "_", os.path.splitext(os.path.basename(row["videopath"]))[0])
    # a hash of the row's identity: the same row gets the same name in every run and on every rank
    digest = hashlib.sha256(f"{row['videopath']}\x1f{row['neg_caption']}".encode()).hexdigest()[:12]
    return f"{stem}-{digest}.mp4"


# ---- settings-checked resume: what the videos on disk are made of ----
def resume_record(args, settings):
    """What the videos of out_dir are made of (disk.check_resume): the input, the rows, G and every
    setting that moves a pixel. The cache, compile, tiling and batching options enter only when set,
    so a folder made before them still resumes; --cpu_offload moves no pixel (and the VAE always decodes
    one video at a time, generator.load_generator)."""
    record = {"input_csv": file_hash(args.input_csv), "split": args.split, "misalignment": sorted(args.misalignment),
              "seed": args.seed, "pipeline": args.pipeline, "pipeline_kwargs": args.pipeline_kwargs,
              "dtype": args.dtype, **settings}
    if args.cache != "none":  # the cache and all its settings, ours and --cache_kwargs'
        record.update(cache=args.cache, cache_settings=generator.cache_config(args, settings["num_inference_steps"], None)[1])
    # a compiled transformer, tiled decoding and a batch's kernels may each round floats otherwise
    record.update({k: getattr(args, k) for k in ("compile", "vae_tiling") if getattr(args, k)})
    if args.prompts_per_call > 1:  # absent at 1: the folders of runs before --prompts_per_call resume
        record["prompts_per_call"] = args.prompts_per_call
    return record


# ---- the calls of G, and the videos already on disk ----
def calls_of_g(rows, per_call):
    """The rows in G's calls, per_call at a time, by their place in the whole list: rows 0..p-1, p..2p-1,
    ... (the last call may be shorter). A row's companions in a call do not depend on the GPU count."""
    # fixed by place, not by rank: runs.shard then deals whole calls to the ranks
    return [rows[i:i + per_call] for i in range(0, len(rows), per_call)]


def this_share(args, dist):
    """Whose calls of G this process renders, as the Dist that runs.shard deals by: torchrun's rank of
    world_size, or with --shard i/n the calls i, i + n, ... in a process of its own (a job of an array,
    preemptible: no process group, no rank to wait for; the run without --shard writes the CSV)."""
    if not args.shard:
        return dist
    i, n = map(int, args.shard.split("/")) if re.fullmatch(r"\d+/\d+", args.shard) else (0, 0)
    if not i < n:  # 3/3 too: SLURM's --array 1-3 counts from 1
        raise UserError(f"--shard {args.shard!r}: give i/n with 0 <= i < n, e.g. 0/3 (a job array: --array 0-2 "
                        f"and --shard $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT)")
    if dist.world_size > 1:  # torchrun's ranks already split the rows, and rank 0 writes the CSV
        raise UserError(f"--shard {args.shard}: a shard is one process; run it with python, not torchrun")
    return Dist(rank=i, world_size=n, master=False)


def who(args):
    """How this process names itself in what it prints: 'rank 0' (torchrun prints rank 0's), or 'shard i/n'."""
    return f"shard {args.shard}" if args.shard else "rank 0"


def shard_done(todo, args):
    """A shard has rendered its calls: it says how many of all the rows' videos are on disk, and
    what writes generated.csv (the same flags without --shard, once every shard is done)."""
    done = sum(on_disk(row, args.out_dir) for row in todo)
    print0(f"shard {args.shard}: done; {done} of {plural(len(todo), 'video')} on disk. " + (
        "Every shard is done: " if done == len(todo) else "Once every shard is done, ")
        + "the same flags without --shard write generated.csv (and render any row still missing)")


def not_on_disk(calls, out_dir, args):
    """This process's calls of G that still have a video to write, and the number of those videos; rank 0
    (or a shard) prints its share (a call with a row on disk runs whole again: its rows keep their companions)."""
    share = [row for call in calls for row in call]  # this rank's rows, done or not
    # a call runs again if any of its rows is missing: its other rows are rendered, not rewritten
    mine = [call for call in calls if not all(on_disk(row, out_dir) for row in call)]
    left = sum(not on_disk(row, out_dir) for call in mine for row in call)
    done = len(share) - left  # a rerun says how much an earlier run finished
    print0(f"{who(args)}: {left} of its {plural(len(share), 'row')} to render" + (f", {done} on disk already" if done else ""))
    return mine, left


def on_disk(row, out_dir):
    """Whether the row's video is done: it exists under its final name. video_io.write_video writes a
    *.tmp<pid>.mp4 and renames it last, so a killed run's partial file never counts as done."""
    return os.path.exists(os.path.join(out_dir, row["syn_video"]))  # the name alone: the row's identity, hashed


def videos_kept(out_dir):
    """Whether any video is in <out_dir>/videos/, done or being written (a *.tmp<pid>.mp4 of a process
    that may still be running): the work resume.json protects. None (a first run stopped by a setting
    G refused in its first call, before its first video): the corrected command's record replaces it."""
    return bool(glob.glob(os.path.join(glob.escape(out_dir), "videos", "*.mp4")))


def wait_for_videos(todo, out_dir, dist):
    """Rank 0 waits until every row's video is on disk, the other ranks' too (runs.wait_for_files)."""
    pending = [row for row in todo if not on_disk(row, out_dir)]  # the rows of the other ranks' calls
    if pending:
        print0(f"waiting for {plural(len(pending), 'video')} from the other ranks")
    # polled (at most every 5 s): not a collective, so ranks may finish far apart; stopped only when no
    # video came for --dist_timeout seconds (a rank died: a lost node does not end this one's torchrun)
    wait_for_files([os.path.join(out_dir, row["syn_video"]) for row in pending], every=5, timeout=dist.timeout)
