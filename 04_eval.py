r"""04_eval.py: §6 (datasets and metrics, Tables 3-5), f(V, t) of Eq. 1 on VideoCon's test sets.

Reads   task files in VideoCon's released layouts, one flag per task (the layouts: read_task)
          --videocon_llm / --videocon_human  entailment: ROC-AUC (Table 3 LLM, Human, Human-Hard)
          (VideoCon's videocon_human.csv as released, video_url and no videopath: <--video_root>/<URL's file name>)
          --ssv2_temporal / --ssv2_events    text-to-video retrieval: mAP, R@1/5/10
          --atphard                          5-way QA: accuracy, causal (C) / temporal (T)
        --scores FILE instead of a model: FILE (ours or VideoCon's) on the one task given
Writes  <out_dir>/<task>_scores.csv  videopath, caption, score = f(V,t), logit = a (a rerun scores
        only what is missing); <task>_skipped.csv, what was left out and why; results.json; and
        prints Table 3 with our row

  python 04_eval.py --adapter runs/train/adapter --video_root data/videos --ssv2_temporal data/videocon/eval_ssv2_temporal.csv
  torchrun --standalone --nproc_per_node 4 04_eval.py ...(the same flags)
  python 04_eval.py --ssv2_temporal data/videocon/eval_ssv2_temporal.csv \
      --scores data/videocon/eval_ssv2_temporal_scores.csv   # VideoCon's released scores: CPU, seconds

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
from synvita import disk, runs, shared_prefix, video_io, video_llm

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
    model: str = video_llm.DEFAULT_MODEL
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
    video_root: str = "data/videos"
    """folder that the CSVs' videopaths are relative to (README, "Data and models")"""
    strip_prefix: str = ""
    """removed from the start of every videopath before joining --video_root (e.g. /local2/hbansal/nextqa/)"""
    num_frames: int = 8
    """frames per video (Video-LLaVA: 8)"""
    sampling: Literal["uniform", "middle"] = "uniform"
    """frame sampling: 'uniform' (Video-LLaVA) or 'middle' (VideoCon / mPLUG-Owl)"""
    batch_size: int = 64
    """captions packed after one copy of their video's prompt prefix in a row of a forward pass
    (shared_prefix.answer_states)"""
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
        # (read_task refuses such a file before any scoring; this guards rows given directly)
        if groups[description(r["caption"])].setdefault(r["videopath"], int(r["match"])) != int(r["match"]):
            raise common.UserError(f"{r['videopath']}, {description(r['caption'])!r}: listed as a match and as a "
                                   f"non-match")
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
        kind = types.get((os.path.splitext(os.path.basename(video))[0], question.strip()), "?")[0]
        for k in ("all", kind):  # a question counts overall and under its type
            total[k] += 1
            right[k] += int(int(group[int(np.argmax(f))]["option"]) == int(group[0]["answer"]))
    accuracy = {name: 100 * right[k] / total[k] for name, k in (("accuracy", "all"), ("accuracy_C", "C"),
                                                                ("accuracy_T", "T")) if total[k]}  # in %
    # results.json names the first 20 dropped questions (and counts them all)
    return {"questions": total["all"], "questions_dropped": len(dropped), "dropped": dict(list(dropped.items())[:20]),
            "questions_without_type": total["?"], **accuracy}


def question_types(args):
    """ATP-Hard's question types, {(video id, question): type}: they are in NExT-QA's own file, not in
    the statements file. Read before any scoring; ids and questions stripped, the type's case ignored
    (its first letter is the split: C causal, T temporal)."""
    path = args.atphard_types or os.path.join(os.path.dirname(args.atphard), "nextqa-atphard.csv")
    rows = disk.read_csv(path, ["video", "question", "type"], texts=("video", "question", "type"))
    return {(r["video"].strip(), r["question"].strip()): r["type"].strip().upper() for r in rows}


def task_metrics(name, rows, scores, args, types=None):
    """The metrics of one task: retrieval (SSv2), accuracy (ATP-Hard, `types`: question_types) or
    ROC-AUC (VideoCon)."""
    if name.startswith("ssv2"):
        return retrieval(rows, scores, args.candidates or CANDIDATES[name], args.ties)
    if name == "atphard":
        return atp_accuracy(rows, scores, types if types is not None else question_types(args))
    out = entailment_auc(rows, scores)
    if name == "videocon_human":  # Human-Hard: the same AUC over the rows marked hard (read_task: a bool)
        hard = entailment_auc([r for r in rows if r["hard"] is True], scores)
        out.update({"auc_hard": hard.get("auc"), "items_hard": hard["items"]})
    return out


# ---- §6 datasets: VideoCon's released task files ----
def description(caption):
    """The description inside an mPLUG-Owl prompt; a plain caption is returned as it is."""
    return match.group(1) if (match := PROMPT.search(caption)) else caption


def read_task(name, path):
    """Rows of a task file, every cell checked before any scoring; returns (rows, report, pairs to
    score: {(videopath, description): the file's line of its first row}). Rows with a bad field
    count, an empty text, another split, a negative equal to its caption, or an item given again
    are skipped, named and counted (report["rows_skipped"], the lines in rows.skipped). A cell that
    is not a value its column takes, one item with two labels, or a file that cannot measure anything
    is an error naming the file (and lines)."""
    # the layouts: videocon_*  videopath, caption, neg_caption (+ split; + hard for Human)
    #              ssv2_*      videopath, caption, match
    #              atphard     videopath, question, answer, option, caption (a statement)
    #   and VideoCon's videocon_human.csv as released: video_url, caption, neg_caption, nle, hard
    required = {"atphard": ["question", "answer", "option"], "videocon_human": ["neg_caption", "hard"],
                "videocon_llm": ["neg_caption"]}.get(name, ["match"])
    # the columns holding a text t to score
    texts = ("caption", "neg_caption") if name.startswith("videocon") else ("caption",)
    # the column naming each video: videopath, or for that released Human file its video_url
    columns = csv_header(path)  # read_csv below names the file if it cannot be read
    url_layout = name == "videocon_human" and "video_url" in columns and "videopath" not in columns
    where = "video_url" if url_layout else "videopath"
    rows = disk.read_csv(path, [where, "caption", *required], texts=(where, *texts))
    n_rows = len(rows) + sum(map(len, rows.skipped.values()))  # as read, bad rows included
    if where == "video_url":  # each row's videopath: its URL's file name, under --video_root
        videopaths_from_urls(path, rows)
    parse_cells(path, rows)  # every cell now, not after hours of scoring
    # Table 3's 'LLM' column is VideoCon's test split (compared without case or spaces); and an
    # entailment row whose negative is its caption has nothing to tell apart
    rows = skip_rows(path, rows, "of another split than test", lambda _, r: name == "videocon_llm" and
                     r.get("split", "test").strip().lower() != "test")
    rows = skip_rows(path, rows, "neg_caption equal to caption", lambda _, r: len(texts) == 2 and
                     description(r["caption"]) == description(r["neg_caption"]))
    rows = one_label_per_item(name, path, rows)  # an item twice would weigh twice in AUC / mAP
    # results.json tells how many rows the file had and why any were left out
    report = {"file": path, "rows": n_rows, "rows_skipped": {k: len(v) for k, v in rows.skipped.items()},
              **({"videopath": "the file name of video_url"} if url_layout else {})}
    if name == "videocon_llm":  # Table 3's LLM column: how many test rows it is measured on
        report["rows_in_split_test"] = len(rows)
    if not rows:  # nothing to score: say so now, not with an empty Table 3 row
        raise common.UserError(f"{path}: no row left to evaluate")
    if name.startswith("ssv2") and len({r["match"] for r in rows}) < 2:  # AP needs both labels
        raise common.UserError(f"{path}: every row has match = {rows[0]['match']}; retrieval needs both labels")
    pairs = {}  # each (V, t) once, with the line of the first row that holds it
    for line, r in zip(rows.lines, rows):
        for t in texts:  # f(V, t) is scored once per pair, whichever rows share it
            pairs.setdefault((r["videopath"], description(r[t])), line)
    return rows, report, dict(sorted(pairs.items()))


# the integer cells 04 reads and the values each takes (ATP-Hard: 5 candidate answers, 0-4)
INTEGER_CELLS = {"match": (0, 1), "option": (0, 4), "answer": (0, 4)}
INTEGER = re.compile(r"\s*[+-]?\d+(\.0*)?\s*")  # " 1 ", "1", "1.0"; not inf, nan, 1e400, 1.5, True, ""
# the `hard` flag of VideoCon-Human, as pandas (True / False) or a person writes it
FLAGS = {"true": True, "yes": True, "1": True, "1.0": True, "false": False, "no": False, "0": False, "0.0": False}


def parse_cells(path, rows):
    """Each cell as the value it means, in place, before any scoring: ids stripped (videopath,
    question), `match` / `option` / `answer` integers in their range, `hard` a bool. Cells that mean
    the same are read the same; any other value is an error naming file:line and column."""
    for line, r in zip(rows.lines, rows):
        r["videopath"] = r["videopath"].strip()  # a space around a path or id is never part of it
        if "question" in r:  # ATP-Hard groups its statements by (videopath, question)
            r["question"] = r["question"].strip()
        for column, (low, high) in INTEGER_CELLS.items():
            if column not in r:  # each task has its own columns
                continue
            value = r[column]
            # no float(): it takes inf, nan, 1e400 (inf too) and "1_0"; a label is a whole number
            if not INTEGER.fullmatch(value) or not low <= int(value.split(".")[0]) <= high:
                allowed = "0 or 1" if high == 1 else f"an integer from {low} to {high}"  # the message's range
                raise common.UserError(f"{path}:{line}: column {column}: {value!r} is not {allowed}")
            r[column] = int(value.split(".")[0])  # int() takes the spaces and a sign, not the ".0"
        if "hard" in r:  # Table 3's Human-Hard column: a misread flag moves a row in or out silently
            if (flag := FLAGS.get(r["hard"].strip().lower())) is None:
                raise common.UserError(f"{path}:{line}: column hard: {r['hard']!r} is not True or False")
            r["hard"] = flag


def skip_rows(path, rows, why, skip):
    """The rows for which skip(line, row) is false; the others are named in one printed line and counted
    under `why` in rows.skipped (and so in results.json and <task>_skipped.csv)."""
    kept = rows.where(lambda line, r: not skip(line, r))  # read_csv's Rows: lines stay beside rows
    if lines := sorted(set(rows.lines) - set(kept.lines)):  # the lines left out
        runs.print0(f"{path}: {len(lines)} row(s) skipped, {why}: line(s) {', '.join(map(str, lines[:20]))}"
                      + (", ..." if len(lines) > 20 else ""))
        rows.skipped[why] = rows.skipped.get(why, []) + lines  # one list: results.json and the skip file
    return kept


def one_label_per_item(name, path, rows):
    """Each item once, with one label: a row that gives an earlier row's item with the same label (a
    caption as a whole prompt, a space around a number) is skipped and counted; one item with two
    labels is an error naming both lines, in every task. Items: SSv2 (V, t) -> match; VideoCon
    (V, t) -> caption (1) or neg_caption (0), a row (V, t, t_neg) -> hard; ATP-Hard a row (V,
    question, option, statement) -> answer, and the 5 statements of one question share one answer.
    (VideoCon's ATP-Hard file repeats a statement as several options of a question, the right one
    among them once: they all stay, scored alike, as VideoCon's script measures them.)"""
    first, again = {}, []  # item -> (line, label) of its first row; the lines that repeat one
    for line, r in zip(rows.lines, rows):
        v, t = r["videopath"], description(r["caption"])
        if name.startswith("videocon"):  # t is a positive of V, t_neg a negative: never both
            n = description(r["neg_caption"])
            facts = [((v, t, n), r.get("hard")), ((v, t), "caption (match 1)"), ((v, n), "neg_caption (match 0)")]
        elif name == "atphard":  # one option of one question: one statement, one right answer
            facts = [((v, r["question"], r["option"], t), r["answer"])]
        else:
            facts = [((v, t), r["match"])]
        for item, label in facts:
            old_line, old = first.setdefault(item, (line, label))
            if old != label:  # which label is right is the user's call, not ours
                raise common.UserError(f"{path}: lines {old_line} and {line} conflict: {item} is {old} on one, "
                                       f"{label} on the other")
        again += [line] if first[facts[0][0]][0] != line else []  # the row's whole item seen before
    if name == "atphard":  # a question's answer is one label spread over its 5 rows
        one_answer_per_question(path, rows)
    return skip_rows(path, rows, "the same item as an earlier row", lambda line, r: line in again)


def one_answer_per_question(path, rows):
    """ATP-Hard: the 5 statements of a question (a (videopath, question) group of 5 rows, which the
    metric measures) are options 0-4 once each and share one `answer`, or the file is refused naming
    two lines. A group of another size is dropped and counted by atp_accuracy, as in VideoCon's script
    (the released file has one: two NExT-QA questions with one wording on one video, 10 statements)."""
    groups = defaultdict(list)  # (videopath, question) -> [(line, row)]
    for line, r in zip(rows.lines, rows):
        groups[(r["videopath"], r["question"])].append((line, r))
    for (video, question), group in groups.items():
        options = {}  # option -> the line of its statement
        for line, r in group if len(group) == 5 else ():  # the groups atp_accuracy measures
            # accuracy compares argmax_option f(V, statement) with the first row's answer
            if r["answer"] != group[0][1]["answer"]:
                problem, old = f"answer {group[0][1]['answer']} and answer {r['answer']}", group[0][0]
            elif (old := options.setdefault(r["option"], line)) != line:  # which of the two would argmax name?
                problem = f"option {r['option']} twice"
            else:
                continue
            raise common.UserError(f"{path}: lines {old} and {line} conflict: {video}, question {question!r}: {problem}")


def csv_header(path):
    """The column names of a CSV file, as a set; empty if it cannot be read (disk.read_csv then says why)."""
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
            raise common.UserError(f"{path}:{line}: video_url {url!r} has no file name")
        if (other := first.setdefault(r["videopath"], (line, url)))[1] != url:
            raise common.UserError(f"{path}: lines {other[0]} and {line}: two video_urls with the file name "
                             f"{r['videopath']!r} ({other[1]}, {url})")
    # one line, so that a reader knows where the clips are looked for
    runs.print0(f"{path}: no videopath column: each video_url is read as <--video_root>/<its file name>, "
                  f"e.g. {rows[0]['video_url'].strip()} -> {rows[0]['videopath']}")


# ---- §3 Eq. (1): f(V, t) for every (video, caption) pair of a task ----
def prompts_too_long(path, pairs, model, processor, args):
    """f(V, t) (Eq. 1) read at positions the LLM never saw would be silently wrong: {pair: why} for
    the pairs whose prompt runs past video_llm.max_positions(model), named by file:line in one printed
    line. Measured once per task with its first readable video (Video-LLaVA: 8 x 257 video tokens
    whatever the video; Qwen-VL: by its size); none readable: {} (nothing is scored, main says why)."""
    limit = video_llm.max_positions(model)
    videos = (load_video(v, args)[1] for v in sorted({v for v, _ in pairs}))
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


def score_task(name, pairs, model, processor, args, dist):
    """Score the pairs that no earlier run scored, videos sharded over ranks, appending to this
    rank's part file as it goes; rank 0 then merges everything into <task>_scores.csv.

    No collective: videos are sharded before the resume scan, so no rank needs to agree with the
    others on what is done, and rank 0 waits for each rank's `finished` file (runs.wait_for_files),
    which also carries that rank's unreadable videos, however far apart the shards finish."""
    todo = pairs_left(name, pairs, args, dist)  # this rank's {videopath: captions still unscored}
    videos = sorted(todo)
    bad = []  # this rank's unreadable videos: [videopath, the error naming its file]
    part = os.path.join(args.out_dir, f"{name}_scores.rank{dist.rank}.jsonl")  # this rank's part file
    os.makedirs(args.out_dir, exist_ok=True)
    with open(part, "a", encoding="utf-8") as fh:
        # lists of --video_batch videos; threads decode the next list while f runs on this one
        chunks = runs.progress(decoded_videos(videos, args), total=-(-len(videos) // args.video_batch), desc=name)
        for chunk in chunks:
            bad += [[v, str(frames)] for v, frames in chunk if isinstance(frames, Exception)]
            batch = [(v, frames) for v, frames in chunk if not isinstance(frames, Exception)]
            if not batch:  # no video of this list could be read
                continue
            # one entry per (V, t) pair: captions[j] is scored on the video batch[index[j]]
            index = [k for k, (v, _) in enumerate(batch) for _ in todo[v]]
            captions = [c for v, _ in batch for c in todo[v]]
            # §3 Eq. (1): each video encoded once, its prompt prefix run once per row of captions;
            # yes_no: (pairs, 2) = logit_Yes, logit_No where the answer starts; a: (pairs,)
            with torch.no_grad():
                yes_no = shared_prefix.yes_no_logits(model, processor, [frames for _, frames in batch], captions, index,
                                              prompt=args.prompt, per_row=args.batch_size)
                a = common.alignment_logit(yes_no[:, 0], yes_no[:, 1])  # f = alignment_score(a)
            # one record a line, [videopath, caption, f, a], f and a with 9 significant digits (a
            # float32 read back exactly); JSON escapes a caption's line ends: a line is a record
            fh.write("".join(json.dumps([batch[k][0], c, f"{common.alignment_score(x).item():.9g}",
                                         f"{x.item():.9g}"]) + "\n" for k, c, x in zip(index, captions, a)))
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
    dist = runs.setup_distributed()
    tasks = {name: getattr(args, name) for name in TASKS if getattr(args, name)}
    if not tasks:
        raise common.UserError(f"give a task file ({', '.join('--' + t for t in TASKS)})")
    if args.scores and len(tasks) != 1:
        raise common.UserError(f"--scores is the scores of one task; {len(tasks)} task files were given")
    if dist.master:  # a killed run's "finished" files; no rank writes one before the barrier below
        list(map(os.remove, glob.glob(os.path.join(glob.escape(args.out_dir), "*_finished.rank*.json"))))
    if dist.world_size > 1:  # at startup, the ranks a moment apart: the only collective of this script
        torch.distributed.barrier()
    # --scores: the metrics of a score file, no model
    model, processor = (None, None) if args.scores else video_llm.load_video_llm(args.model, device=dist.device)
    if model is not None and args.adapter:  # the LoRA adapter of 03_train.py on the base model
        model = video_llm.load_adapter(model, args.adapter, args.model)
    results = {}
    for name, path in tasks.items():
        # ---- §6 datasets: the task file (and ATP-Hard's question types), every cell checked first ----
        rows, report, pairs = read_task(name, path)
        types = question_types(args) if name == "atphard" else None
        # ---- §3 Eq. (1): f(V, t) for every pair within the LLM's positions, or the given score file ----
        too_long = {} if args.scores else prompts_too_long(path, pairs, model, processor, args)
        todo = {p: line for p, line in pairs.items() if p not in too_long}
        score_file, bad = (args.scores, []) if args.scores else score_task(name, todo, model, processor, args, dist)
        if not dist.master:  # rank 0 alone reads the merged scores and measures
            continue
        scores, _, score_report = read_scores(score_file)
        # ---- what was left out, in <task>_skipped.csv; a task with no pair scored stops here ----
        skipped = write_skipped(name, path, rows.skipped, bad, too_long, pairs, args)
        stray = check_scored(name, path, pairs, scores, score_file, bad, too_long)
        # ---- §6 metrics: ROC-AUC / mAP, R@k / accuracy, with what was read, scored, dropped ----
        results[name] = {**task_metrics(name, rows, scores, args, types), **report, "score_file": score_file,
                         "score_file_rows": {**score_report, "not_in_task": stray},
                         "pairs": len(pairs), "pairs_scored": sum(p in scores for p in pairs),
                         "pairs_too_long": len(too_long), "videos_failed": len(bad), "failed": [m for _, m in bad],
                         "skipped": skipped}
        # one line of its numbers and counts; the lists and dicts go to results.json only
        runs.print0(f"{name}: " + ", ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}" for k, v in
                                        results[name].items() if not isinstance(v, (dict, list)) and "file" not in k))
        runs.print0("".join(f"  unreadable video: {m}\n" for _, m in bad[:10]), end="")
    # ---- §6 Table 3: the paper's rows and ours; results.json ----
    if dist.master:  # our row's label: the score file's name, or e.g. "train/adapter"
        label = os.path.basename(args.scores) if args.scores else "/".join(
            os.path.normpath(args.adapter or args.model).split(os.sep)[-2:])
        runs.print0(table3(results, label))
        disk.save_json(os.path.join(args.out_dir, "results.json"), {"args": asdict(args), "results": results})
    if dist.world_size > 1:
        torch.distributed.destroy_process_group()
    return results


# =================================================================================================
# Plumbing: what was left out, score files, resuming a killed run, per-rank part files, decoding.
# A first reader may skip it.
# =================================================================================================
def write_skipped(name, path, rows_skipped, bad, too_long, pairs, args):
    """<out_dir>/<task>_skipped.csv (file, line, videopath, reason): every row read_task left out,
    every unreadable video and every pair past the model's positions, one line each, as counted in
    results.json (rows_skipped, videos_failed, pairs_too_long); no file (an older one removed) if
    nothing was left out. Returns the number of lines."""
    first = {}  # videopath -> the line of its first row: where a user looks for an unreadable video
    for (video, _), line in sorted(pairs.items(), key=lambda x: x[1]):
        first.setdefault(video, line)
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
    if any(p in scores for p in pairs):
        return len(stray)
    if bad:  # every video unreadable: almost always a wrong folder, not broken files
        why = (f"{len(bad)} of {len({v for v, _ in pairs})} videos could not be read, e.g. {bad[0][1]}; "
               f"check --video_root (and --strip_prefix)")
    elif too_long and len(too_long) == len(pairs):  # Eq. 1 read nowhere within the LLM's positions
        why = f"every prompt runs past the model's positions ({next(iter(too_long.values()))})"
    else:  # the keys of the score file and of the task differ (another task, other paths)
        why = f"{score_file} has no score for any of its pairs (e.g. {next(iter(pairs))})"
    raise common.UserError(f"{name}: no pair of {path} was scored: {why}")


# Each rank appends its scores to <task>_scores.rank<r>.jsonl and, once done, writes
# <task>_finished.rank<r>.json (its unreadable videos); rank 0 then merges every part into
# <task>_scores.csv and removes the parts. A rerun reads all of these, scores only what is missing.
def read_scores(path):
    """(videopath, description) -> score from ours (with a header) or VideoCon's headerless score CSV
    (videopath, caption, score[, ...]), read as utf-8-sig: a BOM is not part of the first videopath."""
    if not os.path.isfile(path):  # --scores mistyped: one line, not a traceback
        raise common.UserError(f"{path}: no such score file")
    try:
        text = open(path, encoding="utf-8-sig", newline="").read()
    except UnicodeDecodeError as e:
        raise common.UserError(f"{path}: byte {e.start} is not UTF-8; save the file as UTF-8") from None
    reader = csv.reader(io.StringIO(text, newline=""))  # newline="": a caption may span lines
    numbered, start = [], 1  # (the physical line where a row starts, the row)
    for row in reader:  # lines as an editor shows them, so a skipped row can be found
        numbered.append((start, row))
        start = reader.line_num + 1
    if numbered and numbered[0][1][:3] == SCORE_COLUMNS[:3]:  # our header; VideoCon's files have none
        numbered = numbered[1:]
    return collect_scores(path, numbered)


def collect_scores(path, numbered):
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
        except (IndexError, ValueError):
            malformed.append(line)
            continue
        if key in scores:  # one pair, one f(V, t)
            if scores[key] != score:  # which one is f is unknowable: stop
                raise common.UserError(f"{path}: lines {first[key]} and {line} score {key} as {scores[key]} and {score}")
            duplicates += 1  # VideoCon's ATP-Hard file repeats 8 pairs: counted in results.json
            continue
        scores[key], first[key] = score, line
        rows.append(row)  # as read, for the merge of the parts
    if malformed:
        runs.print0(f"{path}: {len(malformed)} row(s) skipped, not videopath, caption, score in [0, 1]: "
                      f"line(s) {', '.join(map(str, malformed[:20]))}" + (", ..." if len(malformed) > 20 else ""))
    return scores, rows, {"duplicates": duplicates, "malformed": len(malformed)}


def read_part(path):
    """A rank's part file, one JSON list [videopath, caption, score, logit] a line, appended as it goes.
    A record counts only if its line ends with "\n" and parses: a kill or a full disk may cut the
    file at any byte (inside a caption, a CRLF or a UTF-8 character), and the torn record left after
    the last complete one is never read. Returns read_scores' three, and the complete records' bytes."""
    numbered, end = [], 0
    with open(path, "rb") as fh:  # bytes: a cut may fall inside a UTF-8 character
        for line, raw in enumerate(fh, start=1):
            try:
                record = json.loads(raw) if raw.endswith(b"\n") else None
            except ValueError:  # JSON or UTF-8 cut short
                record = None
            if not (isinstance(record, list) and len(record) == 4 and all(isinstance(x, str) for x in record)):
                break  # a torn record: pairs_left cuts the file here before this rank appends again
            numbered.append((line, record))
            end += len(raw)  # the bytes up to here are whole records: a resume keeps exactly them
    return (*collect_scores(path, numbered), end)


def part_files(name, args):
    """The ranks' part files of a task (not a temporary file of disk.atomic_path)."""
    found = glob.glob(os.path.join(glob.escape(args.out_dir), f"{name}_scores.rank*.jsonl"))
    return sorted(p for p in found if re.fullmatch(r"rank\d+", p.rsplit(".", 2)[-2]))


def pairs_left(name, pairs, args, dist):
    """This rank's share of the pairs that no earlier run scored: {videopath: [captions]}.

    Checks first that the scores already in out_dir were made with these settings
    (disk.check_resume), and cuts a killed run's torn last record off this rank's part file."""
    final = os.path.join(args.out_dir, f"{name}_scores.csv")
    adapter = [os.path.join(args.adapter, f) for f in ("adapter_config.json", "adapter_model.safetensors")]
    # scores already in out_dir count only if made with the same task file, model and frames
    disk.check_resume(os.path.join(args.out_dir, f"{name}_settings.json"), {  # the scores here are of this
        "task_file": disk.file_hash(getattr(args, name)), "model": args.model, "prompt": args.prompt,
        "adapter": [disk.file_hash(f) for f in adapter if os.path.exists(f)] if args.adapter else "",
        **{k: getattr(args, k) for k in ("video_root", "strip_prefix", "num_frames", "sampling")}}, dist)
    part = os.path.join(args.out_dir, f"{name}_scores.rank{dist.rank}.jsonl")
    if os.path.exists(part) and (end := read_part(part)[3]) < os.path.getsize(part):
        data = open(part, "rb").read()[:end]  # a killed run's torn record: cut before anything is appended
        with disk.atomic_path(part) as tmp, open(tmp, "wb") as fh:
            fh.write(data)
    # done: every pair in the merged file or in any rank's part (a rerun may use another rank count)
    done = set(read_scores(final)[0]) if os.path.exists(final) else set()
    done = done.union(*(read_part(p)[0] for p in part_files(name, args)))
    videos = set(runs.shard(sorted({v for v, _ in pairs}), dist))  # by video, before the scan
    todo = defaultdict(list)  # videopath -> captions still to score on it (this rank's videos only)
    for video, caption in sorted(set(pairs) - done):
        if video in videos:
            todo[video].append(caption)
    runs.print0(f"{name}: {len(set(pairs) & done)} of {len(pairs)} pairs already scored; "
                  f"{len(todo)} videos to run on rank 0 of {dist.world_size}")
    return todo


def merge_parts(name, bad, args, dist):
    """This rank's part is complete: say so in its `finished` file (with its unreadable videos,
    `bad`). Rank 0 waits for every rank's, merges all parts into <task>_scores.csv, removes them.
    Returns (<task>_scores.csv, the unreadable videos: this rank's, or on rank 0 every rank's)."""
    final = os.path.join(args.out_dir, f"{name}_scores.csv")
    finished = [os.path.join(args.out_dir, f"{name}_finished.rank{r}.json") for r in range(dist.world_size)]
    disk.save_json(finished[dist.rank], bad)  # this rank's part is complete
    if not dist.master:
        return final, bad
    runs.wait_for_files(finished)  # not a barrier: no timeout however far apart the shards finish
    bad = [m for path in finished for m in json.load(open(path, encoding="utf-8"))]
    parts = part_files(name, args)
    # the rows as read: the earlier runs' merged file first, then each rank's complete records
    merged = (read_scores(final)[1] if os.path.exists(final) else []) + [r for p in parts for r in read_part(p)[1]]
    disk.write_csv(final, [dict(zip(SCORE_COLUMNS, r)) for r in merged], SCORE_COLUMNS)
    list(map(os.remove, parts + finished))
    return final, bad


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
            if pending:
                yield [f.result() for f in pending]
            pending = submitted


if __name__ == "__main__":
    runs.run_stage(main, Args)  # a user's mistake: `error: ...`, exit 2
