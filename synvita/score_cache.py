"""02_weight.py's score cache, on synvita/parts.py's per-rank protocol: the per-frame VQAScores of every
(member, V^s) pair, one JSON record a line, so that a killed or repeated run, with any number of ranks,
scores only what is missing. Also the flags checked before it is touched, the members' names that key
it, its settings-checked resume, the ranks' end, and the removal of a run's cache that holds no score."""
import contextlib
import gc
import glob
import json
import os
import re
import shutil

import torch
from tqdm import tqdm

from synvita import parts
from synvita.clip_t5 import load_member
from synvita.disk import check_outputs, check_resume, file_hash
from synvita.runs import UserError, print0, progress, shard
from synvita.video_io import read_video
from synvita.vqa import vqa_prompt


# ---- what a user gave, checked before any work: flags, members, and a run that weighed nothing --------
def check_flags(args):
    """The flags argparse and runs.check_numbers cannot check (its Literal types refuse a wrong --vqascore
    or --weighting): a UserError names each. Then every path 02 writes against every path it reads
    (disk.check_outputs), before anything is read. Returns each member's name (member_name) and --out_csv."""
    if not args.generated_csv:  # (--fig2_only, which needs none, never gets here)
        raise UserError("--generated_csv is required: the generated.csv that 01_generate.py wrote")
    names = [member_name(m) for m in args.models]  # each member's score columns and cache folder
    if len(set(names)) != len(names):
        raise UserError(f"two ensemble members share a name {names}: their score columns would collide")
    out_csv = args.out_csv or os.path.join(os.path.dirname(os.path.abspath(args.generated_csv)), "weighted.csv")
    stem = os.path.splitext(out_csv)[0]  # <dir>/weighted: the JSON, figure, skip list, gallery and cache share it
    ends = ["_skipped.csv", ".json", "_fig2.png"] + ["_gallery.html"] * args.gallery  # beside --out_csv
    writes = {"--out_csv": out_csv, **{f"--out_csv ({end})": stem + end for end in ends},
              "--out_csv (cache_dir)": stem + "_cache"}  # "_dir)": a folder, to check_outputs
    # a member or --video_root given as a local folder is read too: never written over
    check_outputs(writes, {"--generated_csv": args.generated_csv, "--video_root": args.video_root,
                           "--models": [m for m in args.models if os.path.exists(m)]})
    return names, out_csv


# ---- an older 02 output as input: its scores and weight are dropped, this run's replace them ---------
# the columns 02 appends (02_weight.write_weighted): each member's VQAScores, fbar twice, phi
OWN_COLUMNS, OWN_PREFIXES = ("score_syn_target", "score_syn_real", "weight"), ("vqascore_target_", "vqascore_real_")


def without_old_scores(rows, path):
    """read_csv's rows without the columns an earlier 02 run wrote (re-weighing its weighted.csv, e.g.
    with another --weighting): a stale fbar or phi would make a row that this run cannot score look
    scored, and its header would name them twice. One printed line names what is dropped."""
    old = [c for c in rows[0] if c in OWN_COLUMNS or c.startswith(OWN_PREFIXES)]
    if old:
        for r in rows:  # in place: rows keeps its lines and skipped counts
            for c in old:
                del r[c]
        print0(f"{path}: already has 02's output columns {old}: dropped; every score and weight written is this run's")
    return rows


def refuse_empty_run(args, names, cache, caches, skipped):
    """A run that weighed no row stops with the first row's reason (its file:line and video path). A
    member's cache that holds no score is removed with its settings record: a corrected rerun (another
    CSV, folder or model) then starts afresh instead of being refused as made with other settings."""
    for name, (done, _) in zip(names, caches):
        if not done:  # only errors: nothing to resume
            shutil.rmtree(os.path.join(cache, name), ignore_errors=True)
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(cache, f"{name}.json"))
    first, reason = skipped[0], skipped[0]["skip_reason"].removeprefix("kept without a weight: ")
    hint = "; syn_video is read relative to the CSV's folder" if "not found" in reason else ""
    raise UserError(f"{args.generated_csv}: none of its {len(skipped)} rows could be weighed, e.g. "
                    f"{args.generated_csv}:{first['line']} ({first['syn_video']}): {reason}{hint}")


# ---- the cache: one JSON line per (member, video) -------------------------------------------------
# <stem>_cache/<member>/rank<r>.jsonl holds {key, target, real} (T per-frame VQAScores each) or
# {key, error}; <stem>_cache/<member>.json the settings it was made with; finished.rank<r> that a rank
# is done. Records are keyed by content (row_key), so any number of ranks, or a rerun, finds them.
def member_name(model_id):
    """A short column-safe name for an ensemble member: the last part of its hub id or folder."""
    return re.sub(r"[^\w.-]", "_", os.path.basename(os.path.normpath(model_id)))


def row_key(row):
    """A row's identity in the cache: its synthetic video and both captions (not its position)."""
    return json.dumps([row["syn_video"], row["neg_caption"], row["caption"]])


def row_keys(rows):
    """Each row's key (row_key: (V^s, t^s, t^r), as the cache knows it) and {key: the first row that has
    it}: a repeated row is scored once."""
    keys = [row_key(r) for r in rows]  # (V^s, t^s, t^r) of each row, as the cache knows it
    first = {}  # key -> the first row that has it: a repeated row is scored once
    for i, k in enumerate(keys):
        first.setdefault(k, i)
    return keys, first


def read_cache(folder):
    """{key: record} of every scored video in a model's cache folder, all ranks' files together;
    {key: error} of rows that failed (retried by the next run). Whole records only (parts.read_records):
    a line cut by a kill is not one, and the next append cuts it off."""
    done, failed = {}, {}
    for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:  # rank0.jsonl, rank1.jsonl, ...
        for record in parts.read_records(os.path.join(folder, name))[0]:  # in the file's order
            if "error" in record:
                failed[record["key"]] = record["error"]
            else:
                done[record["key"]] = record
    # an error that a later run scored away no longer counts
    return done, {k: e for k, e in failed.items() if k not in done}


# ---- resume and the ranks' end ---------------------------------------------------------------------
def resume(args, names, cache, first, dist):
    """Each member's row indices still to score. Its cache is reused only if it holds scores of this
    CSV with these settings (else a ValueError naming them); every rank reads the caches, then all
    agree before anyone writes to them."""
    source = file_hash(args.generated_csv)  # its content, not its name: an edited CSV is other work
    for model_id, name in zip(args.models, names):
        # what changes a member's scores: the input's content, the model, T, the VQAScore's definition
        settings = {"generated_csv": source, "model": model_id, "num_frames": args.num_frames,
                    "vqascore": args.vqascore}
        check_resume(os.path.join(cache, f"{name}.json"), settings, dist)
    caches = [read_cache(os.path.join(cache, name)) for name in names]
    todo = [[first[k] for k in first if k not in done] for done, _ in caches]  # row indices per model
    # an earlier run's end-of-work markers go (rank 0), then the ranks meet once, before any writes
    parts.clear_finished(os.path.join(cache, "finished.rank*"), dist)
    return todo


def all_ranks_finished(cache, dist):
    """Mark this rank done and leave the process group. True on rank 0, once every rank is done
    (the merge is its alone); False on the other ranks at once."""
    parts.finish(os.path.join(cache, f"finished.rank{dist.rank}"))  # a read-only folder or a full disk names it
    if dist.world_size > 1:
        torch.distributed.destroy_process_group()
    if not dist.master:
        return False
    # not a barrier: a collective would time out while a slow rank still scores its last videos; but
    # no marker and no record of another rank for --dist_timeout seconds stops it (a lost node)
    parts.wait_for_all([os.path.join(cache, f"finished.rank{r}") for r in range(dist.world_size)], dist.timeout,
                       [os.path.join(glob.escape(cache), "*", "rank*.jsonl")])
    return True


# ---- §4: filling the cache, member by member, with the stage's per-video scores -------------------
def score_row(args, model, processor, rows, i, key, root, name, dist, score_video):
    """Row i's cache record for one member: {key, target: T VQAScores of (V^s, t^s), real: T of (V^s, t^r)},
    or {key, error} when its video cannot be scored (--strict: a UserError naming the CSV's line).
    score_video: the stage's per-video scoring call (02_weight.score_video)."""
    row = rows[i]
    # t^s is the negative caption V^s was generated from, t^r the real video's caption
    try:
        path = row["syn_video"] if os.path.isabs(row["syn_video"]) else os.path.join(root, row["syn_video"])
        frames = read_video(path, args.num_frames, "uniform")  # (T, H, W, 3) uint8
        target, real = score_video(model, processor, frames, row["neg_caption"], row["caption"],
                                   args.pairs_per_forward, args.vqascore)
        return {"key": key, "target": target, "real": real}
    except (FileNotFoundError, ValueError) as e:  # missing / undecodable video, caption too long, NaN score
        message = f"{args.generated_csv}:{rows.lines[i]} ({row['syn_video']}), model {name}: {e}"
        if args.strict:
            raise UserError(message) from e
        tqdm.write(f"[rank {dist.rank}] skipping {message}")  # above the progress bar, not through it
        # the error is cached too, for the skip list; the next run scores the row again
        return {"key": key, "error": str(e)}


def score_ensemble(args, rows, keys, names, found, todo, root, cache, dist, score_video):
    """§4: every member's per-frame VQAScores of the rows it has not scored yet (todo: row indices per
    member), this rank's share of them, each video's record appended to the member's cache at once.
    score_video: the stage's per-video scoring call, (model, processor, frames, t^s, t^r, ...) -> T, T."""
    # one model at a time: the whole ensemble never shares a GPU
    for model_id, name, where, rows_todo in zip(args.models, names, found, todo):
        mine = shard(rows_todo, dist)  # the work left is split evenly, however much was cached
        if not mine:
            continue  # nothing left for this member on this rank: it is never loaded
        model, processor = load_member(model_id, device=dist.device, found=where)  # ~25 GB in bf16 (XXL)
        print0(f"{name}: prompt {vqa_prompt(processor, model.config.model_type, '<t>')[0]!r}")
        path = os.path.join(cache, name, f"rank{dist.rank}.jsonl")  # this rank's own file: no two writers
        # parts.appending: a torn last record (a killed run's) is cut off first; a full disk names this file
        with parts.appending(path) as part:
            for i in progress(mine, desc=f"VQAScore {name}"):
                record = score_row(args, model, processor, rows, i, keys[i], root, name, dist, score_video)  # or error
                part.write(json.dumps(record) + "\n")
                part.flush()  # a killed run keeps every finished video
        # free this member's memory before the next one loads
        del model, processor
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
