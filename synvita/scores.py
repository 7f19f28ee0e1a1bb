"""Score files and the work around f(V, t): what 04_eval.py reads, resumes, writes and leaves out.

- score files, ours (<task>_scores.csv: a header; videopath, caption, score = f(V, t), logit = a of
  Eq. 1) or VideoCon's (no header; videopath, caption, score, ...): read(), one f per (V, t) pair;
- a task's pairs left to score: not those past the LLM's positions (prompts_too_long), nor those an
  earlier run with the same settings scored (pairs_left);
- the per-rank part files of synvita/parts.py: <task>_scores.rank<r>.jsonl, one record
  [videopath, caption, f, a] a line, and <task>_finished.rank<r>.json, whose payload is the rank's
  unreadable videos; rank 0 merges the parts into <task>_scores.csv (merge_parts), each pair once
  (merged_rows: a merge killed before it removed the parts is merged again to the same bytes);
- the videos decoded in threads, the next --video_batch while f runs on this one (pair_batches);
- <task>_skipped.csv, every row, video and pair left out, and the counts of results.json (tally).
"""
import contextlib
import csv
import glob
import io
import json
import os
import re
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor

import torch

from synvita import disk, parts, runs, shared_prefix, tasks, video_io, video_llm
from synvita.runs import UserError
from synvita.tasks import description

# <task>_scores.csv, one row per (V, t) pair: score = f(V, t) = sigmoid(a), logit = a (Eq. 1)
SCORE_COLUMNS = ["videopath", "caption", "score", "logit"]


# ---- score files, ours and VideoCon's -------------------------------------------------------------
def read(path):
    """(videopath, description) -> score from ours (with a header) or VideoCon's headerless score CSV
    (videopath, caption, score[, ...]), read as utf-8-sig: a BOM is not part of the first videopath.
    Returns collect()'s three: (scores, rows kept, report)."""
    if not os.path.isfile(path):  # --scores mistyped: one line, not a traceback
        raise UserError(f"{path}: no such score file")
    try:  # the whole file at once: a score file is small beside the hours that made it
        text = open(path, encoding="utf-8-sig", newline="").read()
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: byte {e.start} is not UTF-8; save the file as UTF-8") from None
    reader = csv.reader(io.StringIO(text, newline=""))  # newline="": a caption may span lines
    numbered, start = [], 1  # (the physical line where a row starts, the row)
    for row in reader:  # lines as an editor shows them, so a skipped row can be found
        numbered.append((start, row))
        start = reader.line_num + 1
    if numbered and numbered[0][1][:3] == SCORE_COLUMNS[:3]:  # our header; VideoCon's files have none
        numbered = numbered[1:]
    return collect(path, numbered)


def collect(path, numbered):
    """Scores from (line, [videopath, caption, score, ...]) rows: exact duplicates and rows that do
    not parse (a score that is not a probability f in [0, 1]) are skipped, counted and named by line;
    two scores for one pair are an error naming both lines. Returns (scores, rows kept, report)."""
    scores, first, rows, malformed, duplicates = {}, {}, [], [], 0
    for line, row in numbered:
        if not row:  # a blank line
            continue
        try:  # keyed by the description: VideoCon's captions are whole prompts, ours are not
            key, score = (row[0].strip(), description(row[1])), float(row[2])
            if not 0 <= score <= 1:  # nan, inf, 1.5: not an f of Eq. 1
                raise ValueError(score)
        except (IndexError, ValueError):  # a short row, or a score that is no number
            malformed.append(line)
            continue
        if key in scores:  # one pair, one f(V, t)
            if scores[key] != score:  # which one is f is unknowable: stop
                raise UserError(f"{path}: lines {first[key]} and {line} score {key} as {scores[key]} and {score}")
            duplicates += 1  # VideoCon's ATP-Hard file repeats 8 pairs: counted in results.json
            continue
        scores[key], first[key] = score, line
        rows.append(row)  # as read, for the merge of the parts
    if malformed:  # one printed line, the first 20 lines named
        runs.print0(f"{path}: {len(malformed)} row(s) skipped, not videopath, caption, score in [0, 1]: "
                    f"line(s) {', '.join(map(str, malformed[:20]))}" + (", ..." if len(malformed) > 20 else ""))
    return scores, rows, {"duplicates": duplicates, "malformed": len(malformed)}


# ---- what 04 writes against what it reads, before any work ----------------------------------------
def check_paths(args, files):
    """Before anything is read, loaded or written (the startup's clear_finished removes files): every file
    04 writes in --out_dir, and the folder itself, against every path it reads (disk.check_outputs), so
    that --out_dir through a file, or an output that is one of the inputs however named, stops with one
    line instead of replacing an input or failing hours later. `files`: {task: its file}."""
    writes = {"--out_dir": args.out_dir, "--out_dir (results.json)": os.path.join(args.out_dir, "results.json")}
    ends = ["_skipped.csv"] + ([] if args.scores else ["_scores.csv", "_settings.json"])  # --scores: no model run
    writes.update({f"--out_dir ({name}{end})": os.path.join(args.out_dir, name + end) for name in files for end in ends})
    reads = {f"--{name}": path for name, path in files.items()}
    reads.update({"--atphard_types": tasks.types_file(args) if "atphard" in files else "", "--scores": args.scores,
                  "--video_root": args.video_root, "--adapter": args.adapter,
                  "--model": args.model if os.path.exists(args.model) else ""})  # a local folder, not a hub id
    disk.check_outputs(writes, reads)


# ---- a task's pairs left to score -----------------------------------------------------------------
def prompts_too_long(path, pairs, model, processor, args):
    """f(V, t) (Eq. 1) read at positions the LLM never saw would be silently wrong: {pair: why} for
    the pairs whose prompt runs past video_llm.max_positions(model), named by file:line in one printed
    line. Measured once per task with its first readable video (Video-LLaVA: 8 x 257 video tokens
    whatever the video; Qwen-VL: by its size); none readable: {} (nothing is scored, main says why)."""
    limit = video_llm.max_positions(model)
    videos = (load_video(v, args)[1] for v in sorted({v for v, _ in pairs}))  # lazily: stops at the first good one
    if (frames := next((f for f in videos if not isinstance(f, Exception)), None)) is None:
        return {}  # nothing will be scored either; check_scored says why
    captions = sorted({t for _, t in pairs})
    with torch.no_grad():  # the positions each caption's whole prompt takes with this video
        lengths = dict(zip(captions, shared_prefix.prompt_lengths(model, processor, frames, captions, args.prompt)))
    long = {p: f"prompt of {lengths[p[1]]} positions, past the model's {limit}" for p in pairs if lengths[p[1]] > limit}
    if long:  # named by the task file's lines, as read_csv names the rows it skips
        lines = sorted({pairs[p] for p in long})
        runs.print0(f"{path}: {len(long)} pair(s) left out, their prompt runs past the model's {limit} "
                    f"positions: line(s) {', '.join(map(str, lines[:20]))}" + (", ..." if len(lines) > 20 else ""))
    return long


def pairs_left(name, pairs, args, dist):
    """This rank's share of the pairs that no earlier run scored: {videopath: [captions]}.

    Checks first that the scores already in out_dir were made with these settings
    (disk.check_resume); a killed run's torn last record is cut off this rank's part file when it
    is opened again (appending)."""
    final = os.path.join(args.out_dir, f"{name}_scores.csv")
    adapter = [os.path.join(args.adapter, f) for f in ("adapter_config.json", "adapter_model.safetensors")]
    # done: every pair in the merged file or in any rank's part (a rerun may use another rank count);
    # read before the settings check, which protects them only if there are any
    done = set(read(final)[0]) if os.path.exists(final) else set()
    done = done.union(*(read_part(p)[0] for p in part_files(name, args)))
    # scores already in out_dir count only if made with the same task file, model and frames; a run that
    # stopped before its first score (a full disk) left only its settings: the corrected command's replace them
    disk.check_resume(os.path.join(args.out_dir, f"{name}_settings.json"), {  # the scores here are of this
        "task_file": disk.file_hash(getattr(args, name)), "model": args.model, "prompt": args.prompt,
        "adapter": [disk.file_hash(f) for f in adapter if os.path.exists(f)] if args.adapter else "",
        **{k: getattr(args, k) for k in ("video_root", "strip_prefix", "num_frames", "sampling")}}, dist,
        kept=bool(done))
    videos = set(runs.shard(sorted({v for v, _ in pairs}), dist))  # by video, before the scan
    todo = defaultdict(list)  # videopath -> captions still to score on it (this rank's videos only)
    for video, caption in sorted(set(pairs) - done):
        if video in videos:
            todo[video].append(caption)
    runs.print0(f"{name}: {len(set(pairs) & done)} of {len(pairs)} pairs already scored; "
                f"{len(todo)} videos to run on rank 0 of {dist.world_size}")
    return todo


# ---- the per-rank part files (synvita/parts.py) and their merge -----------------------------------
# Each rank appends its scores to <task>_scores.rank<r>.jsonl and, once done, writes
# <task>_finished.rank<r>.json (its unreadable videos); rank 0 then merges every part into
# <task>_scores.csv and removes the parts. A rerun reads all of these, scores only what is missing,
# and merges a pair that <task>_scores.csv already holds never again (a kill between write and removal).
def part_path(name, args, rank):
    """<out_dir>/<task>_scores.rank<r>.jsonl: the part file that rank r appends its scores to."""
    return os.path.join(args.out_dir, f"{name}_scores.rank{rank}.jsonl")


def is_record(record):
    """A part file's record: the JSON list [videopath, caption, score, logit], four strings (a line
    that parses but is no such list is where a cut file ends: parts.read_records stops there)."""
    return isinstance(record, list) and len(record) == 4 and all(isinstance(x, str) for x in record)


def read_part(path):
    """A rank's part file, one JSON list [videopath, caption, score, logit] a line, appended as it goes.
    Only its whole records count (parts.read_records): a kill or a full disk may cut the file at any
    byte, and the torn record left after the last complete one is never read. Returns read()'s
    three; record k is the file's line k + 1, as a skipped one is named."""
    return collect(path, list(enumerate(parts.read_records(path, is_record)[0], start=1)))


def part_files(name, args):
    """The ranks' part files of a task (not a temporary file of disk.atomic_path)."""
    found = glob.glob(os.path.join(glob.escape(args.out_dir), f"{name}_scores.rank*.jsonl"))
    return sorted(p for p in found if re.fullmatch(r"rank\d+", p.rsplit(".", 2)[-2]))  # rank<digits> only


def clear_finished(args, dist):
    """Before any rank scores: an earlier (killed) run's `finished` markers in out_dir go, every
    task's, and the ranks meet once (parts.clear_finished), so that no marker of that run is taken
    for one of this run. The only collective of 04_eval.py, at startup, the ranks a moment apart."""
    # glob.escape: an out_dir with [ or * in its name is a folder, not a pattern
    parts.clear_finished(os.path.join(glob.escape(args.out_dir), "*_finished.rank*.json"), dist)


@contextlib.contextmanager
def appending(name, args, dist):
    """This rank's part file, open to append records (write_records); a torn record that a killed
    run left after its last whole one is cut off first (parts.appending), so every later record
    starts on a line of its own."""
    with parts.appending(part_path(name, args, dist.rank), is_record) as fh:  # is_record: what a whole one is
        yield fh


def write_records(fh, records):
    """Append (videopath, caption, f, a) records, f and a 0-d tensors, one JSON list a line: f and a
    with 9 significant digits (a float32 read back exactly); JSON escapes a caption's line ends, so
    a line is a record."""
    fh.write("".join(json.dumps([v, c, f"{f.item():.9g}", f"{a.item():.9g}"]) + "\n" for v, c, f, a in records))
    fh.flush()  # written as it goes: a killed run loses at most this batch


def merge_parts(name, bad, args, dist):
    """This rank's part is complete: say so in its `finished` marker, whose payload is its unreadable
    videos (`bad`). Rank 0 waits for every rank's, merges all parts into <task>_scores.csv and
    removes them. Returns (<task>_scores.csv, the unreadable videos: this rank's, on rank 0 every rank's)."""
    final = os.path.join(args.out_dir, f"{name}_scores.csv")
    finished = [os.path.join(args.out_dir, f"{name}_finished.rank{r}.json") for r in range(dist.world_size)]
    parts.finish(finished[dist.rank], bad)  # this rank's part is complete
    if not dist.master:  # rank 0 alone merges
        return final, bad
    # files, not a barrier: no timeout however far apart the shards finish, as long as the other ranks'
    # part files grow (--dist_timeout: a lost node); payloads in rank order
    watch = [os.path.join(glob.escape(args.out_dir), f"{name}_scores.rank*.jsonl")]
    bad = [m for payload in parts.wait_for_all(finished, dist.timeout, watch) for m in payload]
    found = part_files(name, args)
    disk.write_csv(final, [dict(zip(SCORE_COLUMNS, r)) for r in merged_rows(final, found)], SCORE_COLUMNS)
    # a kill from here on leaves parts that <task>_scores.csv already holds: the rerun's merge skips them
    list(map(os.remove, found + finished))  # merged: a rerun reads <task>_scores.csv alone
    return final, bad


def merged_rows(final, found):
    """The rows of <task>_scores.csv after a merge, as read: the earlier runs' merged file first, then each
    part's complete records of the pairs not yet in it. Idempotent: a run killed between writing
    <task>_scores.csv and removing its parts leaves records that the file already holds, and its rerun's
    merge must not add them again (each pair once: the same bytes as a run never killed). One pair with
    two different f(V, t) is an error naming both files, never a silent choice."""
    sources = ([(final, read(final)[1])] if os.path.exists(final) else []) + [(p, read_part(p)[1]) for p in found]
    rows, first = [], {}  # first: (videopath, description) -> (the file that gave it, its f(V, t))
    for path, records in sources:
        for row in records:
            key, score = (row[0].strip(), description(row[1])), float(row[2])  # as read() keys them
            if (old := first.setdefault(key, (path, score))) == (path, score):
                rows.append(row)
            elif old[1] != score:
                raise UserError(f"{old[0]} and {path} score {key} as {old[1]} and {score}")
    return rows


# ---- decoding videos in threads -------------------------------------------------------------------
def load_video(path, args):
    """(videopath, frames (num_frames, H, W, 3) uint8, or the error that names the file)."""
    # VideoCon's ATP-Hard file holds the authors' absolute paths: --strip_prefix maps them onto --video_root
    local = path[len(args.strip_prefix):] if args.strip_prefix and path.startswith(args.strip_prefix) else path
    try:
        return path, video_io.read_video(os.path.join(args.video_root, local), args.num_frames, args.sampling)
    except (OSError, ValueError) as e:  # a missing or broken video is reported, not fatal
        return path, e


def decoded_videos(paths, args):
    """Lists of --video_batch (videopath, frames or the error that names it); while the caller
    works on one list, the next one is decoded in threads."""
    with ThreadPoolExecutor(max(1, args.video_batch)) as pool:  # one thread per video of a list
        pending = []  # the list submitted on the previous turn, yielded once this one is submitted
        for start in range(0, len(paths) + args.video_batch, args.video_batch):  # one more turn: the last list
            submitted = [pool.submit(load_video, p, args) for p in paths[start:start + args.video_batch]]
            if pending:  # the first turn only submits
                yield [f.result() for f in pending]
            pending = submitted


def pair_batches(name, todo, args, unreadable):
    """The lists of --video_batch videos that f runs on, decoded in threads ahead of it (decoded_videos),
    behind a progress bar: (batch, index, captions) with batch = [(videopath, frames)], one entry a (V, t)
    pair, captions[j] scored on the video batch[index[j]] (`todo`: {videopath: captions}). An unreadable
    video is appended to `unreadable` as [videopath, the error naming its file]; a list of none is skipped."""
    videos = sorted(todo)  # in videopath order: the part file's records come in this order
    chunks = runs.progress(decoded_videos(videos, args), total=-(-len(videos) // args.video_batch), desc=name)
    for chunk in chunks:
        unreadable += [[v, str(frames)] for v, frames in chunk if isinstance(frames, Exception)]
        batch = [(v, frames) for v, frames in chunk if not isinstance(frames, Exception)]
        if not batch:  # no video of this list could be read
            continue
        # one entry per (V, t) pair: captions[j] is scored on the video batch[index[j]]
        index = [k for k, (v, _) in enumerate(batch) for _ in todo[v]]
        captions = [c for v, _ in batch for c in todo[v]]
        yield batch, index, captions


# ---- what was left out, and the counts beside the metrics -----------------------------------------
def write_skipped(name, path, rows_skipped, bad, too_long, pairs, args):
    """<out_dir>/<task>_skipped.csv (file, line, videopath, reason): every row tasks.read left out,
    every unreadable video and every pair past the model's positions, one line each, as counted in
    results.json (rows_skipped, videos_failed, pairs_too_long); no file (an older one removed) if
    nothing was left out. Returns the number of lines."""
    first = {}  # videopath -> the line of its first row: where a user looks for an unreadable video
    for (video, _), line in sorted(pairs.items(), key=lambda x: x[1]):
        first.setdefault(video, line)
    # rows tasks.read skipped, then unreadable videos, then pairs past the LLM's positions
    out = [dict(file=path, line=line, videopath="", reason=why) for why, lines in rows_skipped.items() for line in lines]
    out += [dict(file=path, line=first.get(v, ""), videopath=v, reason=f"unreadable video: {m}") for v, m in bad]
    out += [dict(file=path, line=pairs[p], videopath=p[0], reason=why) for p, why in too_long.items()]
    target = os.path.join(args.out_dir, f"{name}_skipped.csv")
    if out:  # the lines agree with the counts: they are the same lists
        disk.write_csv(target, out, ["file", "line", "videopath", "reason"])
        runs.print0(f"{name}: {len(out)} row(s), video(s) and pair(s) left out, each listed in {target}")
    elif os.path.exists(target):  # an earlier run's list; nothing is left out now
        os.remove(target)
    return len(out)


def check_scored(name, path, pairs, scores, score_file, bad, too_long):
    """The score file's keys against the task's pairs: a key that matches no pair is counted, named
    in one printed line and returned; a task none of whose pairs has a score measures nothing and
    stops with one line that says why (a wrong --video_root, every prompt too long, a score file of
    another task) instead of "pairs_scored 0" and exit status 0."""
    if stray := sorted(scores.keys() - pairs.keys()):  # another task's rows, or other paths
        runs.print0(f"{score_file}: {len(stray)} score(s) match no pair of {path}, e.g. {stray[0]}")
    if any(p in scores for p in pairs):  # something to measure
        return len(stray)
    if bad:  # every video unreadable: almost always a wrong folder, not broken files
        why = (f"{len(bad)} of {len({v for v, _ in pairs})} videos could not be read, e.g. {bad[0][1]}; "
               f"check --video_root (and --strip_prefix)")
    elif too_long and len(too_long) == len(pairs):  # Eq. 1 read nowhere within the LLM's positions
        why = f"every prompt runs past the model's positions ({next(iter(too_long.values()))})"
    else:  # the keys of the score file and of the task differ (another task, other paths)
        why = f"{score_file} has no score for any of its pairs (e.g. {next(iter(pairs))})"
    raise UserError(f"{name}: no pair of {path} was scored: {why}")


def tally(name, path, rows, pairs, score_file, bad, too_long, args):
    """Rank 0, a task's scores read back: f = {(V, t): f(V, t)} from `score_file` (read), every row,
    video and pair left out written to <task>_skipped.csv (write_skipped), and no pair scored stops
    the run (check_scored). Returns (f, the counts results.json gives beside the task's metrics)."""
    f, _, score_report = read(score_file)  # f keyed by (videopath, description), as the metrics look it up
    skipped = write_skipped(name, path, rows.skipped, bad, too_long, pairs, args)
    stray = check_scored(name, path, pairs, f, score_file, bad, too_long)  # no pair scored: stops here
    # what was read, scored and left out, in this order in results.json
    return f, {"score_file": score_file, "score_file_rows": {**score_report, "not_in_task": stray},
               "pairs": len(pairs), "pairs_scored": sum(p in f for p in pairs),
               "pairs_too_long": len(too_long), "videos_failed": len(bad), "failed": [m for _, m in bad],
               "skipped": skipped}
