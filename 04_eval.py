r"""04_eval.py: §6 (datasets and metrics, Tables 3-5), f(V, t) of Eq. 1 on VideoCon's test sets.

Reads   task files in VideoCon's released layouts, one flag per task (the layouts: synvita/tasks.py)
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
import os
from collections import defaultdict
from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np
import torch

import common
from synvita import disk, runs, scores, shared_prefix, tasks, video_llm

description = tasks.description  # VideoCon's captions may be mPLUG-Owl's whole prompt: f is keyed by its description

# Paper Table 3 (AUC / mAP / accuracy, %), printed beside our numbers.
PAPER_TABLE3 = {"Video-LLaVA zero-shot": [62.98, 70.37, 65.99, 11.64, 7.11, 38.56],
                "VideoCon (Video-LLaVA)": [85.86, 80.09, 75.74, 19.77, 10.01, 38.76],
                "SynViTA (Video-LLaVA)": [85.43, 80.86, 76.86, 20.10, 11.21, 39.88],
                "VideoCon (mPLUG-Owl 7B)": [88.39, 77.16, 74.76, 13.00, 10.37, 35.46],
                "SynViTA (mPLUG-Owl 7B)": [86.45, 77.48, 74.54, 17.32, 12.54, 37.31]}
# Table 3's columns: (header, task, the key of that task's metric in results.json)
COLUMNS = [("LLM", "videocon_llm", "auc"), ("Human", "videocon_human", "auc"),
           ("Human-Hard", "videocon_human", "auc_hard"), ("SSv2-Temporal", "ssv2_temporal", "mAP"),
           ("SSv2-Events", "ssv2_events", "mAP"), ("ATP-Hard", "atphard", "accuracy")]
TASKS = ["videocon_llm", "videocon_human", "ssv2_temporal", "ssv2_events", "atphard"]  # the flags, in running order
CANDIDATES = {"ssv2_temporal": 216, "ssv2_events": 588}  # videos per query (18 and 49 queries)

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
    sampling: Literal["uniform", "middle", "videocon"] = "uniform"
    """frame sampling: 'uniform' (Video-LLaVA), 'middle', or 'videocon' (VideoCon's rule for mPLUG-Owl, 32 frames)"""
    batch_size: int = 64
    """captions packed after one copy of their video's prompt prefix in a row of a forward pass
    (shared_prefix.answer_states)"""
    video_batch: int = 4
    """videos vision-encoded and prefixed together (and decoded ahead, in as many threads)"""
    out_dir: str = "runs/eval"
    """score CSVs, results.json"""
    dist_timeout: int = runs.DIST_TIMEOUT
    """under torchrun: seconds without progress from another rank (its score records) before rank 0
    stops, naming what is missing (a lost node), and torch.distributed's timeout"""
    # checked before any work (runs.check_numbers): every number above finite and >= 0 (0 as its
    # --help says), and these above 0
    POSITIVE = ("num_frames", "batch_size", "video_batch", "dist_timeout")

# ---- §3 Eq. (1): f(V, t) = sigmoid(logit_Yes - logit_No) for every (video, caption) pair of a task ----
@torch.no_grad()  # f is only read here: no graph
def score_task(name, pairs, model, processor, args, dist):
    """f(V, t) of the pairs no earlier run scored, videos sharded over ranks, each appending to its part file as it
    goes; rank 0 then merges all into <task>_scores.csv (no collective: it waits for each rank's `finished` marker)."""
    todo = scores.pairs_left(name, pairs, args, dist)  # this rank's {videopath: captions still unscored}
    bad = []  # this rank's unreadable videos: [videopath, the error naming its file]
    with scores.appending(name, args, dist) as part:  # this rank's part file, a torn last record cut off
        # --video_batch videos at a time, decoded ahead in threads; captions[j] is scored on batch[index[j]]
        for batch, index, captions in scores.pair_batches(name, todo, args, bad):
            # §3 Eq. (1): each video encoded once, its prompt prefix run once per row of captions;
            # yes_no: (pairs, 2) = logit_Yes, logit_No where the answer starts; a: (pairs,)
            yes_no = shared_prefix.yes_no_logits(model, processor, [frames for _, frames in batch], captions, index,
                                                 prompt=args.prompt, per_row=args.batch_size)
            a = common.alignment_logit(yes_no[:, 0], yes_no[:, 1])  # f = alignment_score(a)
            # one record a pair, [V, t, f(V, t), a]: f = sigmoid(a), each of its own a
            scores.write_records(part, [(batch[k][0], c, common.alignment_score(x), x)
                                        for k, c, x in zip(index, captions, a)])
    return scores.merge_parts(name, bad, args, dist)

# ---- §6 metrics: Table 3's numbers, computed as VideoCon's released scripts compute them ----
# Each takes a task's rows and `scores` = {(videopath, description): f(V, t)} and measures only the pairs
# that have a score; what it cannot measure is dropped and counted, never guessed.
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
    groups = tasks.match_groups(rows)  # query t -> {videopath: match}, one label a (V, t) (else an error)
    kept, dropped, tie_sensitive = [], {}, 0
    for caption, match in sorted(groups.items()):
        videos = sorted(v for v in match if (v, caption) in scores)  # by videopath, as VideoCon
        labels = np.array([match[v] for v in videos])  # (scored videos,) 1: V matches the query
        if len(videos) != candidates or not labels.any():  # incomplete, or with nothing to find
            dropped[caption] = f"{len(videos)} scored candidates, {labels.sum()} positive"
            continue
        # s: (candidates,) f(V, t) of each candidate V for the query t
        s = np.array([scores[(v, caption)] for v in videos], dtype=np.float64)
        # NOTE (deviation): VideoCon ranks retrieval candidates with np.argsort(-scores), whose order among
        # EQUAL scores depends on the numpy build and CPU (SIMD sorts on AVX2 / AVX-512, introsort elsewhere).
        # --ties videocon (default) makes that same call, so it equals VideoCon's script on the machine it
        # runs on; --ties stable breaks ties by videopath (VideoCon's candidate order), the same everywhere.
        # results.json counts the queries whose metrics depend on the order of ties ("tie_sensitive_queries").
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
    """ATP-Hard as VideoCon's src/eval_atphard.py: group rows by (videopath, question); a group with exactly 5 scored
    statements predicts the option of the highest score (the first on a tie) and is right if that is `answer`.
    Accuracy overall and by the question type's first letter (C causal, T temporal), by (video id, question)."""
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

def task_metrics(name, rows, scores, args, types=None):
    """One task's metrics: retrieval (SSv2), accuracy (ATP-Hard, `types`: tasks.question_types) or ROC-AUC."""
    if name.startswith("ssv2"):
        return retrieval(rows, scores, args.candidates or CANDIDATES[name], args.ties)
    if name == "atphard":
        return atp_accuracy(rows, scores, types if types is not None else tasks.question_types(args))
    out = entailment_auc(rows, scores)
    if name == "videocon_human":  # Human-Hard: the same AUC over the rows marked hard (tasks.read: a bool)
        hard = entailment_auc([r for r in rows if r["hard"] is True], scores)
        out.update({"auc_hard": hard.get("auc"), "items_hard": hard["items"]})
    return out

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
    dist = runs.setup_distributed(timeout=args.dist_timeout)
    files = tasks.files_given(args, TASKS)  # {task: its file}, in TASKS' order; none, or --scores with two: an error
    scores.check_paths(args, files)  # --out_dir: not through a file, and none of its outputs an input
    scores.clear_finished(args, dist)  # a killed run's "finished" markers go; the one collective, at startup
    # --scores: the metrics of a score file, no model
    model, processor = (None, None) if args.scores else video_llm.load_video_llm(args.model, device=dist.device)
    if model is not None and args.adapter:  # the LoRA adapter of 03_train.py on the base model
        model = video_llm.load_adapter(model, args.adapter, args.model)
    results = {}
    for name, path in files.items():
        # ---- §6 datasets: the task file (and ATP-Hard's question types), every cell checked first ----
        rows, report, pairs = tasks.read(name, path)
        types = tasks.question_types(args) if name == "atphard" else None
        # ---- §3 Eq. (1): f(V, t) for every pair within the LLM's positions, or the given score file ----
        too_long = {} if args.scores else scores.prompts_too_long(path, pairs, model, processor, args)
        todo = {p: line for p, line in pairs.items() if p not in too_long}
        score_file, bad = (args.scores, []) if args.scores else score_task(name, todo, model, processor, args, dist)
        if not dist.master:  # rank 0 alone reads the merged scores and measures
            continue
        # ---- f read back; what was left out, in <task>_skipped.csv; a task with no pair scored stops here ----
        f, counts = scores.tally(name, path, rows, pairs, score_file, bad, too_long, args)  # f: {(V, t): f(V, t)}
        # ---- §6 metrics: ROC-AUC / mAP, R@k / accuracy, with what was read, scored, dropped ----
        results[name] = {**task_metrics(name, rows, f, args, types), **report, **counts}
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

if __name__ == "__main__":
    runs.run_stage(main, Args)  # a user's mistake: `error: ...`, exit 2
