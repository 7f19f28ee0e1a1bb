"""04_eval.py: §6 (datasets and metrics, Tables 3-5), f(V, t) of Eq. 1 on VideoCon's test sets.

Reads   task files in VideoCon's released layouts, one flag per task (the layouts: read_task)
          --videocon_llm / --videocon_human  entailment: ROC-AUC (Table 3 LLM, Human, Human-Hard)
          (VideoCon's videocon_human.csv as released, video_url and no videopath: <--video_root>/<URL's file name>)
          --ssv2_temporal / --ssv2_events    text-to-video retrieval: mAP, R@1/5/10
          --atphard                          5-way QA: accuracy, causal (C) / temporal (T)
        --scores FILE instead of a model: FILE (ours or VideoCon's) on the one task given
Writes  <out_dir>/<task>_scores.csv  videopath, caption, score = f(V,t), logit = a (a rerun scores
        only what is missing); <out_dir>/results.json; and prints Table 3 with our row

  python 04_eval.py --adapter runs/train/adapter --video_root /data/ssv2 --ssv2_temporal eval_ssv2_temporal.csv
  torchrun --standalone --nproc_per_node 4 04_eval.py ...(the same flags)
  python 04_eval.py --ssv2_temporal ../shared/data/videocon/eval_ssv2_temporal.csv \
      --scores ../shared/data/videocon/eval_ssv2_temporal_scores.csv   # no model: CPU, seconds

A CPU-sized run with a tiny random model: README, "A CPU-sized chain".
"""
import csv
import glob
import io
import json
import os
import re
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np
import torch

import common

# Paper Table 3 (AUC / mAP / accuracy, %), printed beside our numbers.
PAPER_TABLE3 = {
    "Video-LLaVA zero-shot": [62.98, 70.37, 65.99, 11.64, 7.11, 38.56],
    "VideoCon (Video-LLaVA)": [85.86, 80.09, 75.74, 19.77, 10.01, 38.76],
    "SynViTA (Video-LLaVA)": [85.43, 80.86, 76.86, 20.10, 11.21, 39.88],
    "VideoCon (mPLUG-Owl 7B)": [88.39, 77.16, 74.76, 13.00, 10.37, 35.46],
    "SynViTA (mPLUG-Owl 7B)": [86.45, 77.48, 74.54, 17.32, 12.54, 37.31],
}
# Table 3's columns: (header, task, the key of that task's metric in results.json)
COLUMNS = [("LLM", "videocon_llm", "auc"), ("Human", "videocon_human", "auc"),
           ("Human-Hard", "videocon_human", "auc_hard"), ("SSv2-Temporal", "ssv2_temporal", "mAP"),
           ("SSv2-Events", "ssv2_events", "mAP"), ("ATP-Hard", "atphard", "accuracy")]
# the task flags, in the order the tasks run
TASKS = ["videocon_llm", "videocon_human", "ssv2_temporal", "ssv2_events", "atphard"]
CANDIDATES = {"ssv2_temporal": 216, "ssv2_events": 588}  # videos per query (18 and 49 queries)
# VideoCon's `caption` columns may hold mPLUG-Owl's whole prompt: the description is in its quotes
PROMPT = re.compile(r'description: "(.*)"\?', re.S)
# <task>_scores.csv, one row per (V, t) pair: score = f(V, t) = sigmoid(a), logit = a (Eq. 1)
SCORE_COLUMNS = ["videopath", "caption", "score", "logit"]


@dataclass
class Args:
    model: str = common.DEFAULT_MODEL
    """the base video LLM f: hub id or local directory"""
    prompt: Literal[tuple(common.PROMPT_FORMATS)] = "llava_v1"
    """Video-LLaVA's prompt (common.PROMPT_FORMATS): 'llava_v1' = the released code's, with LLaVA's
    system sentence; 'card' = the transformers model card's; other families use their chat template"""
    adapter: str = ""
    """optional LoRA adapter directory (03_train.py's <out_dir>/adapter), loaded with peft"""
    videocon_llm: str = ""
    """VideoCon LLM entailment CSV (Table 3 'LLM'); only rows with split == test if it has a split column"""
    videocon_human: str = ""
    """VideoCon-Human CSV with a `hard` column (Table 3 'Human' and 'Human-Hard'); VideoCon's own
    videocon_human.csv (video_url, no videopath) is read as the clips <--video_root>/<each URL's file name>"""
    ssv2_temporal: str = ""
    """SSv2-Temporal retrieval CSV (eval_ssv2_temporal.csv: videopath, caption, match)"""
    ssv2_events: str = ""
    """SSv2-Events retrieval CSV, same layout"""
    atphard: str = ""
    """ATP-Hard CSV (eval-nextqa-atphard.csv: videopath, question, answer, option, caption)"""
    atphard_types: str = ""
    """NExT-QA rows with the question `type`, for the C / T split (default: nextqa-atphard.csv beside --atphard)"""
    candidates: int = 0
    """videos per retrieval query; queries with another count are dropped (0: 216 Temporal, 588 Events)"""
    ties: Literal["videocon", "stable"] = "videocon"
    """order of equal retrieval scores: 'videocon' (np.argsort, as released) or 'stable' (by videopath)"""
    scores: str = ""
    """a score CSV to evaluate with no model (needs exactly one task)"""
    video_root: str = "."
    """folder that the CSVs' videopaths are relative to"""
    strip_prefix: str = ""
    """removed from the start of every videopath before joining --video_root (e.g. /local2/hbansal/nextqa/)"""
    num_frames: int = 8
    """frames per video (Video-LLaVA: 8)"""
    sampling: Literal["uniform", "middle"] = "uniform"
    """frame sampling: 'uniform' (Video-LLaVA) or 'middle' (VideoCon / mPLUG-Owl)"""
    batch_size: int = 64
    """captions packed after one copy of their video's prompt prefix in a row of a forward pass
    (common.answer_states)"""
    video_batch: int = 4
    """videos vision-encoded and prefixed together (and decoded ahead, in as many threads)"""
    out_dir: str = "runs/eval"
    """score CSVs, results.json"""


# ---- §6 metrics: Table 3's numbers, computed as VideoCon's released scripts compute them ----
# Each takes a task's rows and `scores` = {(videopath, description): f(V, t)} and measures only
# the pairs that have a score; what it cannot measure is dropped and counted, never guessed.
def entailment_auc(rows, scores):
    """VideoCon entailment: each row gives (video, caption, 1) and (video, neg_caption, 0);
    ROC-AUC (sklearn, ties count 1/2) over the items that have a score."""
    from sklearn.metrics import roc_auc_score
    # (V, t, label) items, a set: a video and caption that several rows share count once
    items = {(r["videopath"], description(r[t]), int(t == "caption")) for r in rows for t in ("caption", "neg_caption")}
    # (f, label), in sorted order: the same AUC input whatever the row order
    scored = [(scores[(v, c)], y) for v, c, y in sorted(items) if (v, c) in scores]
    out = {"items": len(scored), "items_without_score": len(items) - len(scored)}
    if len({y for _, y in scored}) == 2:  # AUC needs both a positive and a negative
        out["auc"] = 100 * roc_auc_score([y for _, y in scored], [s for s, _ in scored])
    return out


def ranking_metrics(ranked_labels):
    """0/1 labels, best score first -> AP (mean precision at the positives' ranks), R@k (a positive in the top k)."""
    ranked = np.asarray(ranked_labels)
    precision = np.cumsum(ranked) / np.arange(1, len(ranked) + 1)  # precision at each rank
    return {"AP": precision[ranked == 1].mean(), **{f"R@{k}": float(ranked[:k].any()) for k in (1, 5, 10)}}


def retrieval(rows, scores, candidates, ties="videocon"):
    """Text-to-video retrieval as VideoCon's src/calc_ssv2.py: per query caption, its candidate
    videos in videopath order, ranked by np.argsort(-score); mAP and R@1/5/10 (%) over the queries
    with exactly `candidates` scored videos (others are dropped and named)."""
    groups = defaultdict(dict)  # query caption -> {videopath: match}
    for r in rows:
        # one video is a match of a query or not, never both: two labels would make AP ambiguous
        if groups[description(r["caption"])].setdefault(r["videopath"], int(r["match"])) != int(r["match"]):
            raise ValueError(f"{r['videopath']}, {description(r['caption'])!r}: listed as a match and as a non-match")
    kept, dropped, tie_sensitive = [], {}, 0
    for caption, match in sorted(groups.items()):
        videos = sorted(v for v in match if (v, caption) in scores)  # by videopath, as VideoCon
        labels = np.array([match[v] for v in videos])  # (scored videos,) 1: V matches the query
        if len(videos) != candidates or not labels.any():  # incomplete, or with nothing to find
            dropped[caption] = f"{len(videos)} scored candidates, {labels.sum()} positive"
            continue
        # s: (candidates,) f(V, t) of each candidate V for the query t
        s = np.array([scores[(v, caption)] for v in videos], dtype=np.float64)
        # NOTE (deviation): VideoCon ranks retrieval candidates with np.argsort(-scores), whose
        # order among EQUAL scores depends on the numpy build and CPU (SIMD sorts on AVX2 /
        # AVX-512, introsort elsewhere). --ties videocon (default) makes that same call, so it
        # equals VideoCon's script on the machine it runs on; --ties stable breaks ties by
        # videopath (VideoCon's candidate order), the same everywhere. results.json counts the
        # queries whose metrics depend on the order of ties ("tie_sensitive_queries").
        order = np.argsort(-s, kind="stable" if ties == "stable" else None)
        kept.append(ranking_metrics(labels[order]))
        tie_sensitive += any(len(set(labels[s == x])) > 1 for x in np.unique(s))  # a tie mixes labels
    # what was dropped is named in results.json: a short score file shows there, not as a low mAP
    out = {"queries": len(kept), "queries_dropped": len(dropped), "dropped": dropped,
           "tie_sensitive_queries": tie_sensitive, "candidates": candidates, "ties": ties}
    if kept:  # means over the kept queries, in %
        out.update({"mAP" if k == "AP" else k: 100 * float(np.mean([m[k] for m in kept])) for k in kept[0]})
    return out


def atp_accuracy(rows, scores, types):
    """ATP-Hard as VideoCon's src/eval_atphard.py: group rows by (videopath, question); a group with
    exactly 5 scored statements predicts the option of the highest score (the first on a tie) and
    is right if that is `answer`. Accuracy overall and by the first letter of the question type
    (C causal, T temporal), looked up by (video id = file name without extension, question)."""
    # each row is one candidate answer, rewritten as a statement (`caption`) for f to score
    groups = defaultdict(list)  # (videopath, question) -> its scored statements
    for r in rows:
        if (r["videopath"], description(r["caption"])) in scores:
            groups[(r["videopath"], r["question"])].append(r)
    right, total, dropped = defaultdict(int), defaultdict(int), {}  # by "all" and by type letter
    for (video, question), group in sorted(groups.items()):
        if len(group) != 5:  # 5 candidate answers per question
            dropped[f"{video} | {question}"] = f"{len(group)} scored statements"
            continue
        group.sort(key=lambda r: int(r["option"]))  # option order: on a tie, argmax takes the first
        f = [scores[(video, description(r["caption"]))] for r in group]  # (5,) f(V, statement)
        # the types file names a video by its id, the task file by its path; "?": no type found
        kind = types.get((os.path.splitext(os.path.basename(video))[0], question), "?")[0]
        for k in ("all", kind):  # a question counts overall and under its type
            total[k] += 1
            right[k] += int(group[int(np.argmax(f))]["option"] == group[0]["answer"])
    accuracy = {name: 100 * right[k] / total[k] for name, k in (("accuracy", "all"), ("accuracy_C", "C"),
                                                                ("accuracy_T", "T")) if total[k]}  # in %
    # results.json names the first 20 dropped questions (and counts them all)
    return {"questions": total["all"], "questions_dropped": len(dropped), "dropped": dict(list(dropped.items())[:20]),
            "questions_without_type": total["?"], **accuracy}


def task_metrics(name, rows, scores, args):
    """The metrics of one task: retrieval (SSv2), accuracy (ATP-Hard) or ROC-AUC (VideoCon)."""
    if name.startswith("ssv2"):
        return retrieval(rows, scores, args.candidates or CANDIDATES[name], args.ties)
    if name == "atphard":
        # the question types (C / T) are in NExT-QA's own file, not in the statements file
        path = args.atphard_types or os.path.join(os.path.dirname(args.atphard), "nextqa-atphard.csv")
        types = {(r["video"], r["question"]): r["type"] for r in common.read_csv(path, ["video", "question", "type"])}
        return atp_accuracy(rows, scores, types)
    out = entailment_auc(rows, scores)
    if name == "videocon_human":  # Human-Hard: the same AUC over the rows marked hard
        hard = entailment_auc([r for r in rows if r["hard"].strip().lower() in ("true", "1", "yes")], scores)
        out.update({"auc_hard": hard.get("auc"), "items_hard": hard["items"]})
    return out


# ---- §6 datasets: VideoCon's released task files ----
def description(caption):
    """The description inside an mPLUG-Owl prompt; a plain caption is returned as it is."""
    return match.group(1) if (match := PROMPT.search(caption)) else caption


def read_task(name, path):
    """Rows of a task file (common.read_csv: bad rows and exact duplicates named, skipped, counted);
    returns (rows, report, pairs to score). A file that cannot measure anything (every neg_caption
    equal to its caption, no retrieval query with both a match and a non-match) is an error."""
    # the layouts: videocon_*  videopath, caption, neg_caption (+ split; + hard for Human)
    #              ssv2_*      videopath, caption, match
    #              atphard     videopath, question, answer, option, caption (a statement)
    #   and VideoCon's videocon_human.csv as released: video_url, caption, neg_caption, nle, hard
    required = {"atphard": ["question", "answer", "option"], "videocon_human": ["neg_caption", "hard"],
                "videocon_llm": ["neg_caption"]}.get(name, ["match"])
    # the columns holding a text t to score
    texts = ("caption", "neg_caption") if name.startswith("videocon") else ("caption",)
    # the column naming each video: videopath, or for that released Human file its video_url
    columns = csv_header(path)
    url_layout = name == "videocon_human" and "video_url" in columns and "videopath" not in columns
    where = "video_url" if url_layout else "videopath"
    rows = common.read_csv(path, [where, "caption", *required], texts=(where, *texts))
    # results.json tells how many rows the file had and why any were left out
    report = {"file": path, "rows": len(rows) + sum(map(len, rows.skipped.values())),
              "rows_skipped": {k: len(v) for k, v in rows.skipped.items()}}
    if where == "video_url":  # each row's videopath: its URL's file name, under --video_root
        videopaths_from_urls(path, rows)
        report["videopath"] = "the file name of video_url"

    def own_negative(row):  # an entailment row whose negative is its caption: nothing to tell apart
        return len(texts) == 2 and description(row["caption"]) == description(row["neg_caption"])
    if same := [line for line, r in zip(rows.lines, rows) if own_negative(r)]:
        common.print0(f"{path}: {len(same)} row(s) skipped, neg_caption equal to caption: "
                      f"line(s) {', '.join(map(str, same))}")
        report["rows_skipped"]["neg_caption equal to caption"] = len(same)
    # Table 3's 'LLM' column is VideoCon's test split
    rows = [r for r in rows if not own_negative(r) and (name != "videocon_llm" or r.get("split", "test") == "test")]
    if name == "videocon_llm":
        report["rows_in_split_test"] = len(rows)
    if not rows:
        raise ValueError(f"{path}: no row left to evaluate")
    if name.startswith("ssv2") and len({r["match"] for r in rows}) < 2:
        raise ValueError(f"{path}: every row has match = {rows[0]['match']}; retrieval needs matches and non-matches")
    pairs = {(r["videopath"], description(r[t])) for r in rows for t in texts}  # each (V, t) once
    return rows, report, sorted(pairs)


def csv_header(path):
    """The column names of a CSV file, as a set; empty if it cannot be read (common.read_csv then says why)."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            return set(next(csv.reader(fh), []))
    except (OSError, UnicodeDecodeError):
        return set()


def videopaths_from_urls(path, rows):
    """VideoCon-Human as VideoCon releases it: videocon_human.csv names each ActivityNet clip by its
    video_url, a download link. A local copy of the clips keeps their file names, so each row's videopath
    is its URL's file name (the last part of the URL's path, query string and fragment removed), read
    under --video_root. Two URLs with one file name would be one video: an error naming the lines."""
    from urllib.parse import urlsplit
    first = {}  # file name -> (line, URL) of the first row that has it
    for line, r in zip(rows.lines, rows):
        url = r["video_url"].strip()
        r["videopath"] = os.path.basename(urlsplit(url).path)  # https://host/dir/v_x.mp4?sig=1 -> v_x.mp4
        if not r["videopath"]:
            raise ValueError(f"{path}:{line}: video_url {url!r} has no file name")
        if (other := first.setdefault(r["videopath"], (line, url)))[1] != url:
            raise ValueError(f"{path}: lines {other[0]} and {line}: two video_urls with the file name "
                             f"{r['videopath']!r} ({other[1]}, {url})")
    # one line, so that a reader knows where the clips are looked for
    common.print0(f"{path}: no videopath column: each video_url is read as <--video_root>/<its file name>, "
                  f"e.g. {rows[0]['video_url'].strip()} -> {rows[0]['videopath']}")


# ---- §3 Eq. (1): f(V, t) for every (video, caption) pair of a task ----
def score_task(name, pairs, model, processor, args, dist):
    """Score the pairs that no earlier run scored, videos sharded over ranks, appending to this
    rank's part file as it goes; rank 0 then merges everything into <task>_scores.csv.

    No collective: videos are sharded before the resume scan, so no rank needs to agree with the
    others on what is done, and rank 0 waits for each rank's `finished` file (common.wait_for_files),
    which also carries that rank's unreadable videos, however far apart the shards finish."""
    todo = pairs_left(name, pairs, args, dist)  # this rank's {videopath: captions still unscored}
    videos = sorted(todo)
    bad = []  # this rank's unreadable videos: the errors, each naming its file
    part = os.path.join(args.out_dir, f"{name}_scores.rank{dist.rank}.csv")  # this rank's part file
    with open(part, "a", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        if fh.tell() == 0:
            writer.writerow(SCORE_COLUMNS)
        # lists of --video_batch videos; threads decode the next list while f runs on this one
        chunks = common.progress(decoded_videos(videos, args), total=-(-len(videos) // args.video_batch), desc=name)
        for chunk in chunks:
            bad += [str(frames) for _, frames in chunk if isinstance(frames, Exception)]
            batch = [(v, frames) for v, frames in chunk if not isinstance(frames, Exception)]
            if not batch:  # no video of this list could be read
                continue
            # one entry per (V, t) pair: captions[j] is scored on the video batch[index[j]]
            index = [k for k, (v, _) in enumerate(batch) for _ in todo[v]]
            captions = [c for v, _ in batch for c in todo[v]]
            # §3 Eq. (1): each video encoded once, its prompt prefix run once per row of captions;
            # yes_no: (pairs, 2) = logit_Yes, logit_No where the answer starts; a: (pairs,)
            with torch.no_grad():
                yes_no = common.yes_no_logits(model, processor, [frames for _, frames in batch], captions, index,
                                              prompt=args.prompt, per_row=args.batch_size)
                a = common.alignment_logit(yes_no[:, 0], yes_no[:, 1])  # f = alignment_score(a)
            # score f and logit a, with 9 significant digits: enough to read a float32 back exactly
            writer.writerows([batch[k][0], c, f"{common.alignment_score(x).item():.9g}", f"{x.item():.9g}"]
                             for k, c, x in zip(index, captions, a))
            fh.flush()  # written as it goes: a killed run loses at most this batch
    return merge_parts(name, bad, args, dist)


# ---- §6 Table 3: the paper's rows, then ours ----
def table3(results, label):
    """Table 3 (%): the paper's five rows, then ours, labelled `label`; '-': the task did not run."""
    def cell(x):
        return f"{x:>15.2f}" if isinstance(x, float) else f"{'-':>15}"
    lines = [f"{'Table 3 (%)':<34}" + "".join(f"{c:>15}" for c, _, _ in COLUMNS)]
    lines += [f"{name + ' (paper)':<34}" + "".join(map(cell, row)) for name, row in PAPER_TABLE3.items()]
    ours = [results.get(task, {}).get(key) for _, task, key in COLUMNS]  # None: the task did not run
    # our row, its label cut to the first column's width
    return "\n".join(lines + [f"{label[:34]:<34}" + "".join(map(cell, ours))])


def main(args):
    # ---- setup: the tasks asked for, the ranks, f = the video LLM (+ 03_train.py's adapter) ----
    dist = common.setup_distributed()
    tasks = {name: getattr(args, name) for name in TASKS if getattr(args, name)}
    if not tasks or (args.scores and len(tasks) != 1) or args.ties not in ("videocon", "stable"):
        raise ValueError(f"give task files ({', '.join('--' + t for t in TASKS)}), exactly one with --scores; "
                         f"--ties is 'videocon' or 'stable' (got {args.ties!r})")
    if dist.master:  # a killed run's "finished" files; no rank writes one before the barrier below
        list(map(os.remove, glob.glob(os.path.join(glob.escape(args.out_dir), "*_finished.rank*.json"))))
    if dist.world_size > 1:  # at startup, the ranks a moment apart: the only collective of this script
        torch.distributed.barrier()
    # --scores: the metrics of a score file, no model
    model, processor = (None, None) if args.scores else common.load_video_llm(args.model, device=dist.device)
    if model is not None and args.adapter:  # the LoRA adapter of 03_train.py on the base model
        model = common.load_adapter(model, args.adapter, args.model)
    results = {}
    for name, path in tasks.items():
        # ---- §6 datasets: the task file, duplicates dropped ----
        rows, report, pairs = read_task(name, path)
        # ---- §3 Eq. (1): f(V, t) for every (video, caption) pair, or the given score file ----
        score_file, bad = (args.scores, []) if args.scores else score_task(name, pairs, model, processor, args, dist)
        if not dist.master:  # rank 0 alone reads the merged scores and measures
            continue
        scores, _, score_report = read_scores(score_file)
        # ---- §6 metrics: ROC-AUC / mAP, R@k / accuracy, with what was read, scored, dropped ----
        results[name] = {**task_metrics(name, rows, scores, args), **report, "score_file": score_file,
                         "score_file_rows": score_report, "pairs": len(pairs),
                         "pairs_scored": sum(p in scores for p in pairs), "videos_failed": len(bad), "failed": bad}
        # one line of its numbers and counts; the lists and dicts go to results.json only
        common.print0(f"{name}: " + ", ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}" for k, v in
                                        results[name].items() if not isinstance(v, (dict, list)) and "file" not in k))
        common.print0("".join(f"  unreadable video: {m}\n" for m in bad[:10]), end="")
    # ---- §6 Table 3: the paper's rows and ours; results.json ----
    if dist.master:  # our row's label: the score file's name, or e.g. "train/adapter"
        label = os.path.basename(args.scores) if args.scores else "/".join(
            os.path.normpath(args.adapter or args.model).split(os.sep)[-2:])
        common.print0(table3(results, label))
        common.save_json(os.path.join(args.out_dir, "results.json"), {"args": asdict(args), "results": results})
    if dist.world_size > 1:
        torch.distributed.destroy_process_group()
    return results


# =================================================================================================
# Plumbing: score files, resuming a killed run, per-rank part files, decoding threads.
# A first reader may skip it.
# =================================================================================================
# Each rank appends its scores to <task>_scores.rank<r>.csv and, once done, writes
# <task>_finished.rank<r>.json (its unreadable videos); rank 0 then merges every part into
# <task>_scores.csv and removes the parts. A rerun reads all of these, scores only what is missing.
def read_scores(path, part=False):
    """(videopath, description) -> score from ours (with a header) or VideoCon's headerless score CSV
    (videopath, caption, score[, ...]). Exact duplicates and rows that do not parse are skipped and
    counted; two scores for one pair are an error naming file and row. part=True: a rank's part file,
    appended as it goes, whose last line without its line end is a killed run's torn record: it is
    neither read nor counted as done, even when what is left of it parses."""
    scores, rows, report = {}, [], {"duplicates": 0, "malformed": 0}
    with open(path, newline="", encoding="utf-8") as fh:
        text = fh.read()
        if part and not text.endswith("\r\n"):
            text, report["torn"] = text[: text.rfind("\r\n") + 2], 1  # rfind -1: nothing is left
        for i, row in enumerate(csv.reader(io.StringIO(text, newline="")), start=1):
            if i == 1 and row[:3] == SCORE_COLUMNS[:3]:  # our header; VideoCon's files have none
                continue
            try:  # keyed by the description: VideoCon's captions are whole prompts, ours are not
                key, score = (row[0], description(row[1])), float(row[2])
                assert np.isfinite(score)  # nan, inf: malformed
            except (IndexError, ValueError, AssertionError):
                report["malformed"] += 1
                continue
            if key in scores:
                if scores[key] != score:
                    raise ValueError(f"{path}: row {i} scores {key} as {score}, an earlier row as {scores[key]}")
                report["duplicates"] += 1
                continue
            scores[key] = score
            rows.append(row)  # as read, for the merge of the parts
    return scores, rows, report


def pairs_left(name, pairs, args, dist):
    """This rank's share of the pairs that no earlier run scored: {videopath: [captions]}.

    Checks first that the scores already in out_dir were made with these settings
    (common.check_resume), and cuts a killed run's torn last record off this rank's part file."""
    final = os.path.join(args.out_dir, f"{name}_scores.csv")
    adapter = [os.path.join(args.adapter, f) for f in ("adapter_config.json", "adapter_model.safetensors")]
    # scores already in out_dir count only if made with the same task file, model and frames
    common.check_resume(os.path.join(args.out_dir, f"{name}_settings.json"), {  # the scores here are of this
        "task_file": common.file_hash(getattr(args, name)), "model": args.model, "prompt": args.prompt,
        "adapter": [common.file_hash(f) for f in adapter if os.path.exists(f)] if args.adapter else "",
        **{k: getattr(args, k) for k in ("video_root", "strip_prefix", "num_frames", "sampling")}}, dist)
    part = os.path.join(args.out_dir, f"{name}_scores.rank{dist.rank}.csv")
    data = open(part, "rb").read() if os.path.exists(part) else b""
    if not data.endswith(b"\r\n"):  # a killed run may have left half a record: cut it before anything reads it
        with common.atomic_path(part) as tmp, open(tmp, "wb") as fh:
            fh.write(data[: data.rfind(b"\r\n") + 2] if b"\r\n" in data else b"")
    # done: every pair in the merged file or in any rank's part (a rerun may use another rank count)
    parts = sorted(glob.glob(os.path.join(args.out_dir, f"{name}_scores.rank*.csv")))
    done = set().union(*(read_scores(p, part=p != final)[0] for p in [final, *parts] if os.path.exists(p)))
    videos = set(common.shard(sorted({v for v, _ in pairs}), dist))  # by video, before the scan
    todo = defaultdict(list)  # videopath -> captions still to score on it (this rank's videos only)
    for video, caption in sorted(set(pairs) - done):
        if video in videos:
            todo[video].append(caption)
    common.print0(f"{name}: {len(set(pairs) & done)} of {len(pairs)} pairs already scored; "
                  f"{len(todo)} videos to run on rank 0 of {dist.world_size}")
    return todo


def merge_parts(name, bad, args, dist):
    """This rank's part is complete: say so in its `finished` file (with its unreadable videos,
    `bad`). Rank 0 waits for every rank's, merges all parts into <task>_scores.csv, removes them.
    Returns (<task>_scores.csv, the unreadable videos: this rank's, or on rank 0 every rank's)."""
    final = os.path.join(args.out_dir, f"{name}_scores.csv")
    finished = [os.path.join(args.out_dir, f"{name}_finished.rank{r}.json") for r in range(dist.world_size)]
    common.save_json(finished[dist.rank], bad)  # this rank's part is complete
    if not dist.master:
        return final, bad
    common.wait_for_files(finished)  # not a barrier: no timeout however far apart the shards finish
    bad = [m for path in finished for m in json.load(open(path, encoding="utf-8"))]
    parts = sorted(glob.glob(os.path.join(args.out_dir, f"{name}_scores.rank*.csv")))
    # the rows as read: the earlier runs' merged file first, then each rank's part
    merged = [row for p in [final, *parts] if os.path.exists(p) for row in read_scores(p, part=p != final)[1]]
    common.write_csv(final, [dict(zip(SCORE_COLUMNS, r)) for r in merged])
    list(map(os.remove, parts + finished))
    return final, bad


def decoded_videos(paths, args):
    """Lists of --video_batch (videopath, frames or the error that names it); while the caller
    works on one list, the next one is decoded in threads."""
    def load(path):
        # VideoCon's ATP-Hard file holds the authors' absolute paths: --strip_prefix maps them
        # onto --video_root
        local = path[len(args.strip_prefix):] if args.strip_prefix and path.startswith(args.strip_prefix) else path
        try:  # frames: (num_frames, H, W, 3) uint8
            return path, common.read_video(os.path.join(args.video_root, local), args.num_frames, args.sampling)
        except (OSError, ValueError) as e:  # a missing or broken video is reported, not fatal
            return path, e
    with ThreadPoolExecutor(max(1, args.video_batch)) as pool:  # one thread per video of a list
        pending = []  # the list submitted on the previous turn, yielded once this one is submitted
        for start in range(0, len(paths) + args.video_batch, args.video_batch):  # one more turn: the last list
            submitted = [pool.submit(load, p) for p in paths[start:start + args.video_batch]]
            if pending:
                yield [f.result() for f in pending]
            pending = submitted


if __name__ == "__main__":
    common.run_stage(main, Args)  # a user's mistake: `error: ...`, exit 2
