r"""Implements §5 (Eqs. 5-7) and §6's training details of the paper: LoRA fine-tuning of a video LLM
f(V, t) with Eq. (7), L = L_real + L_syn^phi + lambda_scr * L_scr^phi, on the real VideoCon triplets
(V^r, t^r, t^s) and their synthetic twins V^s = G(t^s), with VideoCon's explanation task mixed in as
the authors' released recipe does.

Reads 02_weight.py's CSV (--train_csv; one per generator for Table 5's "ALL"; a plain VideoCon CSV with
--no-use_syn, the VideoCon baseline), the videos under --video_root and, optionally, VideoCon's explanation
file (--feedback_csv). --syn_types keeps the twins of some misalignment types only (Table 2).
Writes to --out_dir: adapter/ (PeftModel.from_pretrained(base, dir) loads it), args.json, log.jsonl
(one line per optimizer step: every loss term, lr, grad norm, rows/s), skipped.csv (the rows not
trained on and the triplets trained without a twin, each with the reason) and checkpoints/.

The released recipe, 4 GPUs x 4 rows = 16 rows a step (one process: the same global batches):
    torchrun --standalone --nproc_per_node 4 03_train.py --train_csv runs/generate/weighted.csv \
        --feedback_csv data/videocon/videocon_llm_feedback.csv --video_root data/videos \
        --out_dir runs/train
    python 03_train.py <the same flags>
Add --answer_loss vocab for the released code's loss instead of Eqs. (1)-(2) as written.
A CPU-sized run (a tiny random model and 12 toy triplets): README, "A CPU-sized chain".
"""
import contextlib
import functools
import glob
import json
import math
import os
import signal
import sys
import time
import warnings
from collections import Counter, deque
from dataclasses import asdict, dataclass, field, fields
from typing import Literal, NamedTuple, get_args, get_origin

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

import common
from common import WEIGHTINGS
from synvita import disk, runs, shared_prefix, video_io, video_llm

TERMS = ("loss", "l_real", "l_syn", "l_scr", "l_nle")  # Eq. (7), its three terms and the NLE loss, logged apart
NLE_QUESTION = 'What is the misalignment between this video and the description: "{caption}"?'  # VideoCon's
RUN_ONLY = ("out_dir", "resume", "max_steps", "num_workers", "cache_videos", "save_every",
            "gradient_checkpointing")  # no effect on weights: a --resume may change them
# LoRA on the language model's linear layers only; the vision tower's q/k/v_proj stay frozen.
LORA_TARGETS = r".*language_model\..*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
# The pairs (V, t) of a triplet, by name, and the term of Eq. (7) that uses them:
#   "rr" = (V^r, t^r)   "rs" = (V^r, t^s)    Eq. (2): L_real
#   "ss" = (V^s, t^s)   "sr" = (V^s, t^r)    Eq. (5): L_syn^phi, only for a triplet with a twin V^s
#   "r'" = (V^r, t')    "s'" = (V^s, t')     Eq. (6): L_scr^phi, with --use_scr
# With several --train_csv files (Table 5's "ALL"), a triplet has a twin V^s_j from each CSV j that has one:
# twin 0's pairs are named as above, twin j's with j appended ("ss1", "sr1", "s'1", ...); "r'" is
# run once, as it does not depend on the twin.
# t' on a video is that video's OWN caption (t^r on V^r, t^s on V^s) with its words outside
# LCS(t^r, t^s) hidden from attention (footnote 2), as the released code masks the row's own caption.
# An explanation row has one pair, "nle" = (V^r, NLE_QUESTION about t^s), answered by its explanation.
TRIPLET_PAIRS = ("rr", "rs", "ss", "sr", "r'", "s'")
TWIN_PAIRS = ("ss", "sr", "s'")  # the pairs of one twin V^s_j, run once per twin


@dataclass
class Args:
    # ---- inputs and outputs ----
    train_csv: list = field(default_factory=lambda: ["runs/generate/weighted.csv"])
    """02_weight.py's CSV (a plain VideoCon CSV with --no-use_syn); or several, one per generator, for
    Table 5's "ALL": their rows are merged by the real triplet (videopath, caption, neg_caption), which
    trains L_real once, with one twin V^s from each CSV that has a usable one (a str is one CSV)"""
    syn_types: list = field(default_factory=list)
    """Table 2: train on the twins V^s of rows of these `misalignment` types only (e.g. --syn_types action);
    every real triplet still trains on L_real, those of other types as triplets without a twin. [] = all"""
    feedback_csv: str = ""
    """VideoCon's explanation file (videocon_llm_feedback.csv: videopath, neg_caption, nle, split):
    its --split rows are mixed into the batches as the released recipe does; '' = entailment only"""
    split: str = "train"
    """train only on rows of this `split` of both CSVs, when they have that column ("" = all rows):
    VideoCon's val and test rows never train (04 evaluates on its test rows)"""
    video_root: str = "data/videos"
    """the folder that the CSV's `videopath` is relative to"""
    out_dir: str = "runs/train"
    """where adapter/, args.json, log.jsonl and checkpoints/ go"""
    # ---- the model f(V, t) ----
    model: str = video_llm.DEFAULT_MODEL
    """the video LLM f(V, t): a hub id or a local directory"""
    prompt: Literal[tuple(common.PROMPT_FORMATS)] = "llava_v1"
    """Video-LLaVA's prompt (common.PROMPT_FORMATS): 'llava_v1' = the released code's, with LLaVA's
    system sentence; 'card' = the transformers model card's; other families use their chat template"""
    # ---- §5: the terms of Eq. (7) and their weights ----
    use_syn: bool = True
    """train on the synthetic twins V^s (Eqs. 5, 6); --no-use_syn is the VideoCon baseline, L = L_real"""
    use_scr: bool = True
    """add lambda_scr * L_scr^phi (Eq. 6); --no-use_scr is the ablation of Fig. 4"""
    answer_loss: Literal["two_way", "vocab"] = "two_way"
    """'two_way': Eqs. (1)-(2) as written, each term a mean over its own pairs; 'vocab': the released
    code's full-vocabulary cross-entropy on every answer token (Yes/No and the end token, every
    explanation token), weighted by phi on synthetic pairs, divided by the micro-batch's answer tokens"""
    weighting: Literal[("csv", *WEIGHTINGS)] = "csv"
    """phi: 'csv' reads the `weight` column of 02_weight.py; a WEIGHTINGS name recomputes it from
    score_syn_target / score_syn_real ('fixed' = unweighted Eq. 3, 'difference' = Eq. 4; the paper's
    Video-LLaVA run used 'target_x_inv_real', Table 4)"""
    lambda_scr: float = 1.0
    """lambda_scr of Eq. (7): 1.0 for Video-LLaVA, 1e-2 for mPLUG-Owl"""
    gamma: float = 0.2
    """the margin g of Eq. (6)"""
    # ---- §6: LoRA, AdamW, schedule ----
    lora_r: int = 32
    """LoRA rank"""
    lora_alpha: int = 32
    """LoRA scaling alpha"""
    lora_dropout: float = 0.05
    """dropout on the LoRA input"""
    lr: float = 5e-5
    """peak learning rate (5e-5 for Video-LLaVA, 1e-4 for mPLUG-Owl)"""
    weight_decay: float = 1e-4
    """AdamW weight decay"""
    max_grad_norm: float = 1.0
    """gradient clipping"""
    warmup_steps: int = 200
    """linear warm-up steps, then cosine decay to 0"""
    num_epochs: int = 1
    """passes over the CSV"""
    # ---- batches and videos ----
    batch_size: int = 16
    """GLOBAL batch in the released code's rows (a triplet = its Yes row + its No row, an explanation =
    1 row) per optimizer step over all processes and accumulation steps: 16 = the released 4 GPUs x 4,
    so one epoch is (2 x triplets + explanations) / 16 steps, as released"""
    micro_batch_size: int = 4
    """rows per process per forward pass (the released per-GPU batch); at least 2 (one triplet)"""
    num_frames: int = 8
    """frames per video"""
    frame_sampling: Literal["uniform", "middle"] = "uniform"
    """'uniform' (np.linspace, Video-LLaVA) or 'middle' (VideoCon / mPLUG-Owl)"""
    # ---- the run: precision, memory, workers, checkpoints ----
    bf16: bool = True
    """bf16 weights and autocast on GPU (CPU always runs float32); the LoRA weights stay float32"""
    gradient_checkpointing: bool = True
    """recompute the LLM's activations in the backward pass (non-reentrant)"""
    num_workers: int = 2
    """DataLoader processes that decode the next micro-batches' videos"""
    cache_videos: bool = False
    """keep every decoded video in memory (in each process that decodes), so later epochs do not
    decode it again: for small sets trained over several epochs, like the toy world's; all of
    VideoCon would not fit"""
    save_every: int = 100
    """write a checkpoint every this many optimizer steps"""
    resume: bool = False
    """continue the run in out_dir from its latest checkpoint (a folder that holds a run, its adapter/,
    log.jsonl or a checkpoint, takes no new run without it)"""
    max_steps: int = 0
    """stop after this optimizer step, as if killed there (0 = run to the end); the schedule still spans the full run"""
    seed: int = 0
    """seed of the LoRA initialisation, the epoch shuffles and the LoRA dropout"""

    def __post_init__(self):
        if isinstance(self.train_csv, str):  # Args(train_csv="w.csv") in Python: one CSV
            self.train_csv = [self.train_csv]


# =================================================================================================
# §6 data: triplets (V^r, t^r, t^s), their twins V^s = G(t^s) and weights w = phi, explanations
# =================================================================================================
# A training item is a dict. A triplet: kind "triplet", line (its line in the first CSV that lists
# it), real (V^r's path), caption (t^r), neg (t^s), syn (V^s's path; None: trained without a twin),
# w (phi; 0 without a twin), rows = 2, and, only where later --train_csv files add twins (Table 5's
# "ALL"), more_twins = [(V^s's path, phi), ...] (twins() lists them all). An explanation: kind "nle",
# line, real, neg (the t^s it explains), nle (its text), rows = 1. Rows are counted as the released
# code counts them: a triplet is TWO rows, its Yes row (V^r, t^r) and its No row (V^r, t^s), each
# with its twin; an explanation is ONE. --batch_size and --micro_batch_size count these rows. A
# triplet with k twins is still 2 rows: its forward pass grows with k (3 more pairs a twin).
NO_TWIN = "trained without a twin: "  # skipped.csv's reason for a row whose twin V^s is not used


def number(cell):
    """A CSV cell as a float: NaN if empty or "nan" (02's unscored V^s: the triplet trains without its
    twin, counted); None if it is no number at all ("0,5", "high": phi_weights names it)."""
    try:
        return float(cell) if cell.strip() else float("nan")
    except ValueError:
        return None


def load_triplets(args):
    """The CSV rows as triplets with absolute video paths and the weight w (phi clamped at 0, as in the
    released code). A row whose real video is missing is a counted skip. A row whose twin cannot be
    used (no syn_video, its file missing, a missing/NaN weight or score) trains on L_real alone, its
    synthetic terms 0, as the released code trains such rows; it is counted and listed too. Both go
    to skipped.csv with the reason. A video that exists but cannot be decoded stops the run.
    Several --train_csv files (Table 5's "ALL", one per generator) are merged by the real triplet
    (videopath, caption, neg_caption; the n-th such row of one CSV with the n-th of another): it is
    ONE triplet, in the order the CSVs first list it, with a twin from each CSV that has a usable one. The reader's skipped
    rows (an exact duplicate, a wrong field count, an empty caption) are listed in skipped.csv too.
    --syn_types (Table 2) leaves out the twins of rows of other `misalignment` types: their triplets
    train as triplets without a twin, counted in one printed line, not in skipped.csv.
    Columns: videopath (relative to --video_root), caption, neg_caption and, with --use_syn,
    syn_video (relative to the CSV's folder unless absolute), what phi is read from and, with
    --syn_types, misalignment."""
    scores = check_data_flags(args)  # the columns phi is read from
    wanted = {t.strip().lower() for t in args.syn_types}  # compared as keep_split compares splits
    keep, skipped, by_key, left_out, types = [], [], {}, Counter(), set()
    for path in args.train_csv:
        rows, w = read_train_csv(path, scores, args)  # the --split rows, w: (rows,) phi, NaN where missing
        skipped += reader_skips(rows, path)  # the reader's bad rows, each once
        seen = Counter()  # the rows of each real triplet met so far in this CSV
        for i, r in enumerate(rows):
            where = dict(file=path, line=rows.lines[i], videopath=r["videopath"])  # a skipped row's place
            triplet = (r["videopath"], r["caption"], r["neg_caption"])  # the real triplet's identity
            seen[triplet] += 1
            key = (*triplet, seen[triplet])  # its n-th row here pairs with its n-th row in the other CSVs
            if key not in by_key:  # the first CSV that lists it: its real part, once
                by_key[key] = new_triplet(r, path, rows.lines[i], args)  # None: V^r is missing
                keep += [by_key[key]] if by_key[key] else []
            types.add(r.get("misalignment", ""))  # the file's types, for an unknown --syn_types
            if by_key[key] is None:  # no V^r: nothing of the triplet can be trained
                skipped.append({**where, "reason": f"video not found: {os.path.join(args.video_root, r['videopath'])}"})
            elif not args.use_syn:  # the VideoCon baseline: L_real alone
                continue
            elif wanted and r["misalignment"].strip().lower() not in wanted:  # Table 2: not this type's twins
                left_out[r["misalignment"]] += 1
            elif no_twin := add_twin(by_key[key], r, w[i], path):  # else this CSV's twin joins the triplet
                skipped.append({**where, "reason": NO_TWIN + no_twin})
    known = {t.strip().lower() for t in types}
    if unknown := [t for t in args.syn_types if t.strip().lower() not in known]:  # a typo would train no twin
        raise common.UserError(f"--syn_types {unknown}: no row of {csv_names(args)} has this misalignment; "
                               f"its types: {sorted(types)}")
    if not keep:
        raise common.UserError(f"{csv_names(args)}: no row can be trained on "
                               f"({len(skipped)} skipped: {skipped[0]['reason']})")
    if left_out:  # one line: the twins --syn_types leaves out, by type
        runs.print0(f"--syn_types {args.syn_types}: {sum(left_out.values())} twin(s) of other misalignment types "
                      f"left out ({', '.join(f'{k}: {n}' for k, n in sorted(left_out.items()))}); their triplets "
                      f"train on L_real alone (Table 2), not listed in skipped.csv")
    if len(args.train_csv) > 1:  # Table 5's "ALL": how many twins the merged triplets have
        runs.print0(f"{len(args.train_csv)} --train_csv files merged into {len(keep)} triplets; twins per "
                      f"triplet: {dict(sorted(Counter(len(twins(t)) for t in keep).items()))}")
    return keep, skipped


def check_data_flags(args):
    """Refuse flag values that cannot work (every choice flag: argparse refuses them on the command
    line, this check when main(args) is called from Python), before anything is loaded or written;
    returns the columns that phi is read from: 02_weight.py's `weight`, none for w = 1, or the two
    VQAScores it is computed from."""
    for f in fields(Args):  # --prompt, --answer_loss, --weighting, --frame_sampling
        if get_origin(f.type) is Literal and getattr(args, f.name) not in get_args(f.type):
            raise common.UserError(f"--{f.name} {getattr(args, f.name)!r}: use one of {list(get_args(f.type))}")
    if not args.train_csv:  # `--train_csv` with no file after it
        raise common.UserError("--train_csv: give one CSV, or one per generator (Table 5's \"ALL\")")
    if args.syn_types and not args.use_syn:  # the VideoCon baseline has no twin to pick
        raise common.UserError(f"--syn_types {args.syn_types} picks synthetic twins: it needs --use_syn")
    scores = {"csv": ["weight"], "fixed": []}.get(args.weighting, ["score_syn_target", "score_syn_real"])
    return scores if args.use_syn else []  # the VideoCon baseline reads no twin and no weight


def read_train_csv(path, scores, args):
    """One --train_csv's rows of --split (the other splits are counted and left out) and their
    weights w = phi (phi_weights): (rows, (rows,) array, NaN where a cell is missing). A triplet on
    two rows that differ elsewhere is no conflict (the same caption and negative twice for one clip,
    as MSR-VTT's repeated captions give): each row trains, as in the released code."""
    texts = ["videopath", "caption", "neg_caption"]  # an empty syn_video is a triplet without a twin
    columns = texts + (["syn_video"] + scores if args.use_syn else []) + (["misalignment"] if args.syn_types else [])
    rows = disk.keep_split(disk.read_csv(path, columns, texts=texts), args.split, path)
    return rows, phi_weights(rows, scores, args, path)


def reader_skips(rows, path):
    """disk.read_csv's skipped rows (Rows.skipped: {problem: [lines]}) as skipped.csv's entries."""
    return [dict(file=path, line=line, videopath="", reason=problem)  # the reader keeps no cell of a bad row
            for problem, lines in rows.skipped.items() for line in lines]


def new_triplet(r, path, line, args):
    """CSV row r (line `line` of `path`) as a triplet item, its twin not yet added (None if its real
    video V^r is missing)."""
    real = os.path.join(args.video_root, r["videopath"])
    if not os.path.isfile(real):
        return None
    return dict(kind="triplet", file=path, line=line, real=real, caption=r["caption"], neg=r["neg_caption"],
                syn=None, w=0.0, rows=2)


def add_twin(t, r, w, path):
    """Add CSV row r's twin V^s (syn_video, relative to the CSV's folder unless absolute) with its weight w
    = phi to triplet t: the first in syn and w, those of later CSVs in more_twins. Returns why the row's
    twin cannot be used ('' if it is used)."""
    syn = os.path.join(os.path.dirname(os.path.abspath(path)), r["syn_video"]) if r["syn_video"] else ""
    if no_twin := why_no_twin(syn, w):
        return no_twin
    if t["syn"] is None:
        t.update(syn=syn, w=float(w))
    else:  # Table 5's "ALL": another generator's V^s of the same t^s
        t.setdefault("more_twins", []).append((syn, float(w)))
    return ""


def twins(t):
    """A triplet's twins V^s with their weights phi, [(path, phi), ...]: none, or syn and w first, then
    more_twins (one per further --train_csv with a usable twin)."""
    return ([(t["syn"], t["w"])] if t.get("syn") else []) + t.get("more_twins", [])


def csv_names(args):
    """The --train_csv files, as messages name them."""
    return ", ".join(args.train_csv)


def phi_weights(rows, scores, args, path):
    """§5 Eq. (4) / Table 4: each row's weight w = phi(V^s, t^s, t^r), clamped at 0 (NaN where a
    needed cell is missing or not a number). --weighting csv reads 02_weight.py's `weight`; a
    WEIGHTINGS name recomputes it from fbar(V^s, t^s) and fbar(V^s, t^r); 'fixed' (and --no-use_syn)
    is w = 1. A value outside [0, 1] stops the run, naming its lines."""
    for c in scores:  # a cell that is no number is a mistake, not a missing score
        if bad := next((line for line, r in zip(rows.lines, rows) if number(r[c]) is None), None):
            raise common.UserError(f"{path}:{bad}: {c} {rows[rows.lines.index(bad)][c]!r} is not a number")
    column = {c: np.array([number(r[c]) for r in rows]) for c in scores}  # (rows,) each
    for c in scores:  # VQAScores lie in [0, 1], phi <= 1 (a NaN is a counted skip in load_triplets)
        low = 0 if c.startswith("score") else -math.inf  # a negative weight is clamped at 0 below
        if bad := [(line, r[c]) for line, r, v in zip(rows.lines, rows, column[c])
                   if not low <= v <= 1 and not math.isnan(v)]:  # the first named, the others counted
            raise common.UserError(f"{path}:{bad[0][0]}: {c} {bad[0][1]} outside [{low}, 1]"
                                   + (f" (and {len(bad) - 1} more row(s))" if len(bad) > 1 else ""))
    if not args.use_syn or args.weighting == "fixed":
        w = np.ones(len(rows))  # Eq. (3), unweighted
    elif args.weighting == "csv":
        w = column["weight"]
    else:
        ft, fr = column["score_syn_target"], column["score_syn_real"]  # fbar(V^s, t^s), fbar(V^s, t^r)
        w = np.where(np.isfinite(ft) & np.isfinite(fr), WEIGHTINGS[args.weighting](ft, fr), np.nan)
    return np.maximum(w, 0.0)  # phi >= 0 (NaN stays NaN)


def why_no_twin(syn, w):
    """Why a triplet trains without its twin V^s, as the released code trains a row without a
    syn_video ('' if the twin is usable): syn is V^s's path ('' if none), w its weight phi."""
    if not syn:
        return "no syn_video"
    if not os.path.isfile(syn):
        return f"synthetic video not found: {syn}"
    if not math.isfinite(w):
        return "weight is missing or not a number"
    return ""


def load_explanations(args):
    """VideoCon's explanation (NLE) rows, the second task of §6: in videocon_llm_feedback.csv's layout
    (videopath, neg_caption, nle, + split), the rows of --split (all rows without a split column).
    Each is asked `What is the misalignment between this video and the description: "<neg_caption>"?`
    and trained on the explanation's tokens; like the released code's rows without a syn_video, it
    has no synthetic twin and no t'. Returns (rows, skipped)."""
    if not args.feedback_csv:
        return [], []
    texts = ["videopath", "neg_caption", "nle"]  # an empty one is a bad row of the reader, named and counted
    rows = disk.keep_split(disk.read_csv(args.feedback_csv, texts, texts=texts), args.split, args.feedback_csv)
    keep, skipped = [], reader_skips(rows, args.feedback_csv)
    for line, r in zip(rows.lines, rows):
        e = dict(kind="nle", file=args.feedback_csv, line=line, real=os.path.join(args.video_root, r["videopath"]),
                 neg=r["neg_caption"], nle=r["nle"].strip(), rows=1)
        if os.path.isfile(e["real"]):
            keep.append(e)
        else:
            skipped.append(dict(file=args.feedback_csv, line=line, videopath=r["videopath"],
                                reason=f"video not found: {e['real']}"))
    return keep, skipped


# =================================================================================================
# The pairs (V, t) of a micro-batch (TRIPLET_PAIRS) and their alignment logits a (Eq. 1)
# =================================================================================================
class PairSpec(NamedTuple):
    """One pair to run: its prompt, its video and the answer tokens fed after the prompt."""
    item: int  # the position of its triplet or explanation in the micro-batch
    name: str  # "rr", "rs", "ss", "sr", "r'", "s'" (twin j >= 1: "ss1", "sr1", "s'1", ...) or "nle"
    video: str  # V^r's or V^s's path
    caption: str  # the caption t asked about
    other_caption: str | None  # t' pairs: `caption`'s words outside LCS(caption, other_caption) are hidden
    question: str | None  # None: common.QUESTION, VideoCon's entailment question
    answer: list | None  # token ids fed after the prompt (teacher forcing); None: no token loss


class Pair(NamedTuple):
    """One pair's output of micro_batch_pairs; a plain tuple (item, name, a, tokens) underneath."""
    item: int  # the position of its triplet or explanation in the micro-batch
    name: str  # as in PairSpec
    a: torch.Tensor  # 0-dim float32 alignment logit a = logit_Yes - logit_No (Eq. 1); f = sigmoid(a)
    tokens: tuple | None  # (logits (K, vocab), targets (K,)) of the K answer tokens; None: no token loss


def pair_specs(batch, processor, model_type, word, args):
    """The pairs to run for a micro-batch, item by item: a triplet's "rr", "rs", then with a twin "ss",
    "sr", then with --use_scr "r'", "s'", then those of its further twins j ("ssj", "srj", "s'j"; Table
    5's "ALL"); an explanation's "nle". Answer tokens are fed only where a token loss reads them: an
    explanation's always; the entailment pairs' under --answer_loss vocab (the word Yes/No, then the
    end token). word: {"Yes": id, "No": id}."""
    end = [processor.tokenizer.eos_token_id]  # ends an answer (LLaMA's </s>, as the released "ASSISTANT: Yes</s>")
    specs = []
    for k, r in enumerate(batch):
        if r["kind"] == "nle":  # asked what is wrong with t^s on V^r; answered by the explanation
            asked, _ = common.entailment_prompt(processor, model_type, r["neg"], args.prompt, NLE_QUESTION)
            answer = common.answer_ids(processor.tokenizer, asked, r["nle"]) + end
            specs.append(PairSpec(k, "nle", r["real"], r["neg"], None, NLE_QUESTION, answer))
            continue
        vocab = args.answer_loss == "vocab"  # the released loss trains the answer's tokens
        yes, no = ([word["Yes"]] + end, [word["No"]] + end) if vocab else (None, None)
        specs += [PairSpec(k, "rr", r["real"], r["caption"], None, None, yes),  # V^r shows t^r: Yes
                  PairSpec(k, "rs", r["real"], r["neg"], None, None, no)]  # V^r does not show t^s: No
        for j, (syn, _) in enumerate(twins(r)):  # one twin, or one per generator's CSV (Table 5's "ALL")
            specs += [PairSpec(k, twin_pair("ss", j), syn, r["neg"], None, None, yes),  # V^s = G(t^s) shows t^s: Yes
                      PairSpec(k, twin_pair("sr", j), syn, r["caption"], None, None, no)]  # V^s does not show t^r: No
            if args.use_scr:  # t' = the video's own caption, its words outside LCS(t^r, t^s) hidden
                # (V^r, t') does not depend on the twin: run once, with the first
                specs += [PairSpec(k, "r'", r["real"], r["caption"], r["neg"], None, None)] if j == 0 else []
                specs += [PairSpec(k, twin_pair("s'", j), syn, r["neg"], r["caption"], None, None)]
    return specs


def twin_pair(name, j):
    """Twin j's name for a synthetic pair "ss", "sr" or "s'": the name itself for the first twin (j = 0),
    j appended for the others ("ss1", "sr1", "s'1", ...)."""
    return name if j == 0 else f"{name}{j}"


def split_pair(name):
    """A pair name as (name without its twin index, twin index j): "ss1" -> ("ss", 1), "rr" -> ("rr", 0)."""
    base = name.rstrip("0123456789")
    return base, int(name[len(base):] or 0)


def micro_batch_pairs(model, processor, batch, paths, frames, args):
    """Every pair of a micro-batch (pair_specs), from ONE shared_prefix.answer_states call: each video is
    vision-encoded and its prompt prefix run once for all of its pairs. paths, frames: the micro-batch's
    distinct videos (load_videos). Returns a Pair per spec, in order: a in float32; tokens = the
    logits and targets of the answer's K tokens (the word or the explanation, then the end token,
    teacher-forced), or None where no token loss is asked (t' pairs, and the entailment pairs under
    --answer_loss two_way)."""
    hf, tok = video_llm.unwrap(model), processor.tokenizer  # hf: the transformers model under LoRA (and DDP)
    text, _ = common.entailment_prompt(processor, hf.config.model_type, "", args.prompt)
    word = dict(zip(("Yes", "No"), common.answer_token_ids(tok, text)))  # the answers' first token ids
    specs = pair_specs(batch, processor, hf.config.model_type, word, args)
    where = {p: k for k, p in enumerate(paths)}  # a video's path -> its index in frames
    states, logits = shared_prefix.answer_states(
        model, processor, frames, [s.caption for s in specs], [where[s.video] for s in specs],
        hidden=[common.hidden_word_spans(s.caption, s.other_caption) if s.other_caption else None for s in specs],
        prompt=args.prompt, questions=[s.question or common.QUESTION for s in specs],
        answers=[s.answer or [] for s in specs])
    # states[i]: (K_i, hidden), logits[i]: (K_i, vocab); row j predicts answer token j (row 0: the word)
    yes_no = shared_prefix.answer_logits(model, torch.stack([h[0] for h in states]), [word["Yes"], word["No"]])  # (n, 2)
    a = common.alignment_logit(yes_no[:, 0], yes_no[:, 1])  # (n,) Eq. (1)
    return [Pair(s.item, s.name, a[i], (z, torch.tensor(s.answer, device=z.device)) if s.answer else None)
            for i, (s, z) in enumerate(zip(specs, logits))]


def drop_long_prompts(model, processor, items, skipped, args):
    """Leave out every triplet or explanation one of whose prompts runs past the LLM's positions
    (video_llm.max_positions): past them f(V, t) runs on positions the model never saw, and its scores and
    gradients are silently wrong. Each is named (file:line) in one printed line, listed in skipped.csv
    and counted in the summary. Returns (items, skipped)."""
    limit = video_llm.max_positions(model)
    if not math.isfinite(limit):  # a config that states no limit
        return items, skipped
    longest = prompt_positions(model, processor, items, args)  # (items,)
    over = [(it, n) for it, n in zip(items, longest) if n > limit]
    if over:  # one line, as disk.read_csv names its skipped rows
        runs.print0(f"{len(over)} row(s) skipped, prompt too long (past the model's {limit} positions): "
                      + ", ".join(f"{it['file']}:{it['line']}" for it, _ in over[:20])
                      + (", ..." if len(over) > 20 else ""))
    skipped = skipped + [dict(file=it["file"], line=it["line"], videopath=os.path.relpath(it["real"], args.video_root),
                              reason=f"prompt too long: {n} positions, the model has {limit}")
                         for it, n in over]
    return [it for it, n in zip(items, longest) if n <= limit], skipped


def prompt_positions(model, processor, items, args):
    """The positions the longest pair of each item takes, as micro_batch_pairs runs it (pair_specs: t^r,
    t^s and t' (hidden words still take their positions), the answer tokens teacher-forced under
    --answer_loss vocab; an explanation's question and answer): (items,) ints. One real video, read
    once, gives the video's tokens (one count for every video of a LLaVA family; Qwen-VL's follows
    the video's size); shared_prefix.prompt_lengths counts each distinct prompt once, with its own question
    (an explanation asks another one than VideoCon's entailment question)."""
    hf = video_llm.unwrap(model)
    text, _ = common.entailment_prompt(processor, hf.config.model_type, "", args.prompt)
    word = dict(zip(("Yes", "No"), common.answer_token_ids(processor.tokenizer, text)))  # as micro_batch_pairs
    specs = pair_specs(items, processor, hf.config.model_type, word, args)
    # a prompt's length follows from its caption, its question and how many answer tokens it feeds
    keys = [(s.caption, s.question or common.QUESTION, len(s.answer or [])) for s in specs]
    unique = list(dict.fromkeys(keys))  # each measured once (t' and the twins' pairs repeat captions)
    captions, questions, fed = zip(*unique)  # fed: only the count of answer tokens matters here
    video = decode(items[0]["real"], items[0], args)
    length = dict(zip(unique, shared_prefix.prompt_lengths(model, processor, video, captions, args.prompt,
                                                    [[0] * n for n in fed], questions)))  # last position + 1
    longest = [0] * len(items)
    for s, key in zip(specs, keys):
        longest[s.item] = max(longest[s.item], length[key])
    return longest


# =================================================================================================
# §5 Eq. (7): the objective, from the pairs' alignment logits
# =================================================================================================
# NOTE (deviation): with several --train_csv files (Table 5's "ALL": every generator's V^s of each
# t^s) a triplet has k twins. The paper does not say how their terms were combined, and the release
# has no config for "ALL"; we take, for a triplet, the MEAN over its k twins of the per-twin terms of
# Eqs. (5) and (6), so that a triplet with k twins weighs as much as one with a single twin: twin j
# enters L_syn^phi and L_scr^phi with weight phi_j / k. Eq. (6)'s hinges on V^r use the same logits
# for every twin, (V^r, t') included (run once), so they enter with weight mean_j phi_j. L_real is
# counted once per triplet. With one CSV (k <= 1) this is Eqs. (5)-(6) exactly as before.
def objective(pairs, batch, args):
    """Eq. (7): L = L_real + L_syn^phi + lambda_scr * L_scr^phi  (--answer_loss two_way, the default)

    with L_real (Eq. 2), L_syn^phi (Eq. 5) and L_scr^phi (Eq. 6) each a mean over the micro-batch's
    triplets, all from the alignment logits a of micro_batch_pairs' Pairs. A triplet without a twin
    has w = 0, so its synthetic terms are exactly 0; one with k twins takes the mean of its k twins'
    terms (the NOTE above). Plus l_nle, VideoCon's explanation task (not part of Eq. 7), which the
    released recipe adds to the loss. Returns {TERMS: 0-dim tensors}."""
    zero = torch.zeros((), device=pairs[0][2].device)  # a term with nothing to average
    a, w, k = triplet_logits(pairs, batch, zero)  # a[name]: (b,) over the b triplets ({} if b = 0); w: (J, b)
    share = w / torch.tensor(k, device=zero.device).clamp(min=1)  # (J, b): phi_j / k, twin j's part of a triplet
    # ---- §3 Eq. (2): on V^r, its caption t^r (Yes) against the LLM-written negative t^s (No) ----
    l_real = common.loss_real(a["rr"], a["rs"]) if a else zero
    # ---- §5 Eq. (5): on V^s = G(t^s), t^s (Yes) against t^r (No), each triplet weighted by w = phi ----
    # (summed over the twin slots j, each weighted phi_j / k: the mean over a triplet's k twins)
    l_syn = over_twins([common.loss_syn(a[twin_pair("ss", j)], a[twin_pair("sr", j)], share[j])
                        for j in range(len(w))], zero) if args.use_syn else zero
    # ---- §5 Eq. (6): f(V^z, t^z) > f(V^z, t') > f(V^z, t^zbar) by the margin gamma, on both videos ----
    l_scr = over_twins([common.loss_scr(*scr_logits(a, j), share[j], args.gamma)
                        for j in range(len(w))], zero) if args.use_syn and args.use_scr else zero
    # ---- not Eq. (7): VideoCon's explanation task, the mean cross-entropy of the explanations' tokens ----
    explained = [tokens for _, name, _, tokens in pairs if name == "nle" and tokens]  # [(logits, targets)]
    l_nle = zero
    if explained:
        l_nle = F.cross_entropy(torch.cat([x for x, _ in explained]), torch.cat([y for _, y in explained]))
    # ---- §5 Eq. (7), plus the explanations' loss as the released recipe adds it ----
    loss = common.total_loss(l_real, l_syn, l_scr, args.lambda_scr) + l_nle
    return dict(zip(TERMS, (loss, l_real, l_syn, l_scr, l_nle)))


# NOTE (deviation): the default --answer_loss two_way (Eqs. 1-2 as written) weighs Eq. (7)'s terms
# unlike the released loss below, which divides ONE sum of full-vocabulary answer-token cross-
# entropies by the micro-batch's N answer tokens. A triplet with a twin brings 4 pairs of 2 tokens
# (the word, the end token): N = 8 a triplet. Where the word's probability mass sits on Yes/No (its
# full-vocabulary CE = the two-way CE) and the end token is learnt (CE ~ 0), the release's loss is,
# in our terms, L_real/8 + L_syn^phi/8 + lambda_scr L_scr^phi/2 (its L_scr averages half-triplets of
# two hinges, ours triplets of four) = (L_real + L_syn^phi + 4 lambda_scr L_scr^phi) / 8. So
# --lambda_scr 4 gives the release's balance between the terms, at 1/8 of its scale (which gradient
# clipping sees), and only without explanations (their tokens join N). --answer_loss vocab reproduces
# the release exactly; the default keeps the paper's lambda_scr = 1.
# NOTE (deviation): with k twins (Table 5's "ALL", no released config) the released loss is extended
# as its own means count: per token and per half-triplet. Each twin's 2 pairs bring their 4 tokens,
# weighted by that twin's phi, into the one sum and into N; L_scr^phi averages the half-triplets with
# a twin, counted per twin (twin j: its V^s half and the V^r half with weight phi_j). So, unlike the
# two-way mean over twins, a triplet with k twins weighs about k-fold in L_syn^phi and L_scr^phi here,
# as in the release run on the k CSVs concatenated, but with L_real's tokens counted once.
def released_objective(pairs, batch, args):
    """The released code's loss (--answer_loss vocab), in place of Eqs. (1)-(2)'s two-way terms:
        L = 1/N sum_k w_k CE_k  +  lambda_scr * L_scr^phi * b / (2 * twins)
    over every answer token k of the micro-batch (the word and the end token of each entailment pair,
    every token of an explanation, and its end token): CE_k its full-vocabulary cross-entropy
    (common.answer_token_loss), w_k = phi on synthetic pairs (its twin's) and 1 elsewhere, N the
    number of tokens. l_real, l_syn and l_nle are that sum's parts over the real pairs, the synthetic
    pairs and the explanations. L_scr^phi then averages the half-triplets that have a twin, as
    released (half of Eq. 6's per-triplet sum): b triplets with `twins` twins in all."""
    zero = torch.zeros((), device=pairs[0][2].device)  # a term with nothing to sum
    tokens = answer_tokens(pairs, batch)  # pair name -> [(w_k, (logits (K, vocab), targets (K,))), ...]
    n_tokens = sum(len(y) for group in tokens.values() for _, (_, y) in group)  # N, over all pairs
    l_real = token_loss(tokens["rr"] + tokens["rs"], n_tokens, zero)
    l_syn = token_loss(tokens["ss"] + tokens["sr"], n_tokens, zero)  # every twin's pairs
    l_nle = token_loss(tokens["nle"], n_tokens, zero)  # VideoCon's explanation task, in the same sum
    a, w, k = triplet_logits(pairs, batch, zero)
    l_scr = zero
    if args.use_syn and args.use_scr and sum(k):  # the release's mean is over its half-triplets with a twin
        hinges = over_twins([common.loss_scr(*scr_logits(a, j), w[j], args.gamma) for j in range(len(w))], zero)
        l_scr = hinges * len(k) / (2 * sum(k))  # len(k) = b; sum(k): twins, each counted
    loss = common.total_loss(l_real, l_syn, l_scr, args.lambda_scr) + l_nle
    return dict(zip(TERMS, (loss, l_real, l_syn, l_scr, l_nle)))


def triplet_logits(pairs, batch, zero):
    """The micro-batch's b triplets as columns: a {pair name: (b,) alignment logits} ({} if b = 0; a
    pair a triplet lacks, e.g. "ss" without a twin, reads 0), w (J, b): the weight phi of each
    triplet's twin j (0 where it has none; J = the most twins a triplet here has: 0 or 1 with one
    --train_csv), and k: each triplet's number of twins (a list). pairs: Pairs, or plain (item, name,
    a, tokens) tuples."""
    triplets = [twins(r) for r in batch if r["kind"] == "triplet"]  # each triplet's [(V^s, phi), ...]
    k = [len(t) for t in triplets]
    slots = max(k, default=0)  # J
    w = torch.tensor([[t[j][1] if j < len(t) else 0.0 for t in triplets] for j in range(slots)],
                     device=zero.device).reshape(slots, len(triplets))  # phi_j, 0 for a triplet without twin j
    if not triplets:  # a micro-batch of explanations only
        return {}, w, k
    by_item = {(i, name): a for i, name, a, _ in pairs}  # (item position, pair name) -> a, 0-dim
    where = [i for i, r in enumerate(batch) if r["kind"] == "triplet"]  # the triplets' positions in the batch
    names = [name for name in TRIPLET_PAIRS if name not in TWIN_PAIRS]  # rr, rs, r': one per triplet
    names += [twin_pair(name, j) for j in range(slots) for name in TWIN_PAIRS]  # ss, sr, s' of each twin j
    return {name: torch.stack([by_item.get((i, name), zero) for i in where]) for name in names}, w, k


def over_twins(terms, zero):
    """The sum of one term per twin slot j (zero if there is none; the term itself if there is one)."""
    return functools.reduce(torch.add, terms) if terms else zero


def scr_logits(a, j=0):
    """Eq. (6)'s arguments for twin j, each (b, 2) with column 0 = V^s (twin j), column 1 = V^r: the
    video's own caption t^z, the shared t', the other video's caption t^zbar (common.loss_scr)."""
    own = torch.stack([a[twin_pair("ss", j)], a["rr"]], 1)  # the logits of (V^s, t^s), (V^r, t^r)
    shared = torch.stack([a[twin_pair("s'", j)], a["r'"]], 1)  # of (V^s, t'), (V^r, t')
    other = torch.stack([a[twin_pair("sr", j)], a["rs"]], 1)  # of (V^s, t^r), (V^r, t^s)
    return own, shared, other


def answer_tokens(pairs, batch):
    """The answer tokens of the pairs that carry them, by pair name (every twin's under "ss" and "sr"),
    in pair order: [(w_k, (logits (K, vocab), targets (K,))), ...], w_k = the twin's phi for the
    synthetic pairs, 1 otherwise."""
    groups = {name: [] for name in ("rr", "rs", "ss", "sr", "nle")}
    for i, name, _, t in pairs:
        base, j = split_pair(name)  # "ss1" -> ("ss", 1): twin 1's
        if t:  # t' pairs carry no tokens: the released code has no token loss for them, only Eq. (6)
            groups[base].append((twins(batch[i])[j][1] if base in ("ss", "sr") else 1.0, t))
    return groups


def token_loss(group, n_tokens, zero):
    """common.answer_token_loss over a group's tokens, each weighted by its pair's w_k, / N = n_tokens."""
    if not group:
        return zero
    logits, targets = torch.cat([x for _, (x, _) in group]), torch.cat([y for _, (_, y) in group])  # (K, vocab), (K,)
    weights = torch.cat([torch.full((len(y),), w_k, device=zero.device) for w_k, (_, y) in group])  # (K,)
    return common.answer_token_loss(logits, targets, weights, n_tokens)


# =================================================================================================
# Training: §6's LoRA fine-tuning with §5's Eq. (7), under torchrun or in one process
# =================================================================================================
def main(args):
    from peft import LoraConfig, get_peft_model  # heavy imports, loaded only to train
    from transformers import get_cosine_schedule_with_warmup

    dist = runs.setup_distributed()  # torchrun's rank and world size; one process without torchrun
    cuda = dist.device.startswith("cuda")
    # ---- §6 data: the triplets with their twins and weights, and the explanations, in global batches ----
    triplets, skipped = load_triplets(args)  # every flag and input is checked before out_dir is touched
    explanations, skipped_nle = load_explanations(args)
    items, skipped = triplets + explanations, skipped + skipped_nle
    micro_batch_plan(items, args, dist)  # --batch_size's arithmetic, refused now, not after the model loads
    check_out_dir(args)  # an earlier run's folder: only with --resume

    # ---- §6 model: the video LLM f(V, t), frozen, plus LoRA on its language model; AdamW, cosine decay ----
    runs.seed_everything(args.seed)  # the same LoRA initialisation on every rank
    dtype = torch.bfloat16 if cuda and args.bf16 else torch.float32
    model, processor = video_llm.load_video_llm(args.model, dtype=dtype, device=dist.device)
    items, skipped = drop_long_prompts(model, processor, items, skipped, args)  # past the LLM's positions
    plan, accum, total = micro_batch_plan(items, args, dist)  # the same global batches for any process count
    stop = min(total, args.max_steps) if args.max_steps else total  # --max_steps: as if killed there
    settings = checkpoint_settings(args, items)
    print_data(items, skipped, total, accum, args, dist)
    model.config.use_cache = model.config.get_text_config().use_cache = False  # training keeps no KV cache
    if args.gradient_checkpointing:  # non-reentrant; it also makes the input embeddings require grad
        model.activation_checkpointing_enable()
    with warnings.catch_warnings():  # peft 0.21 reads the deprecated `is_gradient_checkpointing` itself:
        warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning)  # not ours
        model = get_peft_model(model, LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                                                 target_modules=LORA_TARGETS)).train()  # freezes every other weight
    params = [p for p in model.parameters() if p.requires_grad]  # the LoRA weights, all that trains
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    scheduler = get_cosine_schedule_with_warmup(optimizer, args.warmup_steps, total)
    start = load_checkpoint(args, settings, model, optimizer, scheduler) if args.resume else 0
    start_out_dir(args, skipped, start, dist)
    # `model` is the PeftModel that is saved; forward and backward go through `ddp_model`: under torchrun
    # a DDP wrapper of it, which averages the LoRA gradients over the processes; in one process, `model`
    ddp_model = DistributedDataParallel(model, device_ids=[dist.local_rank] if cuda else None,
                                        forward_sync_buffers=False) if dist.world_size > 1 else model  # equal buffers

    # ---- §5 Eq. (7): one optimizer step per global batch, accumulated over `accum` micro-batches ----
    loss_fn = released_objective if args.answer_loss == "vocab" else objective  # Eq. (7) as written by default
    batches = iter(video_loader(items, plan, start, stop, accum, args, dist))
    for step in range(start, stop):
        t0, lr = time.time(), scheduler.get_last_lr()[0]
        sums = torch.zeros(len(TERMS), device=dist.device)  # each of TERMS, summed over the micro-steps
        for j in range(accum):
            sums += micro_step(loss_fn, ddp_model, processor, next(batches), step, j == accum - 1, accum, args, dist)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        log_step(sums, step, lr, grad_norm, t0, accum, args, dist)
        if dist.master and (step + 1) % args.save_every == 0:
            save_checkpoint(args, step + 1, settings, model, optimizer, scheduler)

    save_adapter(args, model, dist)  # out_dir/adapter: PeftModel.from_pretrained(base, dir) loads it
    if dist.world_size > 1:
        torch.distributed.destroy_process_group()
    return model


# ===== Plumbing: batching, DataLoader workers, checkpoints. A first reader may skip it. ==========
# ---- batching: micro-batches of whole triplets, the same global batches for any process count ----
def micro_batch_plan(items, args, dist):
    """Every epoch's micro-batches (the plan), the micro-batches each process accumulates per optimizer
    step (accum), and the number of optimizer steps (total). Refuses settings that cannot make
    --batch_size, or that leave nothing to train."""
    accum, rest = divmod(args.batch_size, max(args.micro_batch_size, 1) * dist.world_size)
    if rest or not accum or args.micro_batch_size < 2:
        raise common.UserError(f"--batch_size {args.batch_size} is not a multiple of --micro_batch_size "
                               f"{args.micro_batch_size} (at least 2: a triplet is 2 rows) x {runs.plural(dist.world_size, 'process')}")
    plan = [epoch_micro_batches(items, e, args) for e in range(args.num_epochs)]
    per_global = accum * dist.world_size  # micro-batches in one global batch
    total = sum(len(e) // per_global for e in plan)  # each epoch's tail that fills no global batch is dropped
    if total == 0:
        raise common.UserError(f"{csv_names(args)}: {sum(it['rows'] for it in items)} usable rows, fewer than one "
                               f"--batch_size {args.batch_size}")
    if total == 1 and args.warmup_steps > 0:  # the linear warm-up starts at lr 0: nothing would train
        raise common.UserError(f"1 optimizer step with --warmup_steps {args.warmup_steps}: it runs at lr 0 and the adapter "
                               f"would stay untrained; pass --warmup_steps 0 (or more rows / --num_epochs)")
    return plan, accum, total


def pack(order, sizes, m):
    """Cut a shuffled `order` of items into micro-batches of m released rows: a triplet counts 2 (its
    Yes and No rows, kept together so that they share their two videos), an explanation 1. An item
    that does not fit what is left of a micro-batch waits for the next one, and the next item that
    fits fills the gap; if none is left (an odd m, no explanation left) the micro-batch is one row
    short. The tail that cannot fill m - 1 rows is dropped."""
    queue, left, out = deque(order), Counter(sizes[i] for i in order), []  # left: items per size still queued
    while queue:
        batch, free, k = [], m, 0  # free: rows left in this micro-batch; k: the queue position looked at
        while free and k < len(queue) and any(left[size] for size in range(1, free + 1)):
            item = queue[k]
            if sizes[item] > free:
                k += 1  # it waits at the front for the next micro-batch
                continue
            del queue[k]
            left[sizes[item]] -= 1
            batch.append(item)
            free -= sizes[item]
        if free > 1:  # the queue ran out: the tail is dropped (drop_last)
            break
        out.append(batch)
    return out


def epoch_micro_batches(items, epoch, args):
    """Every micro-batch of epoch `epoch`: a permutation of the items seeded by (seed, epoch), the
    same on every rank (as DistributedSampler.set_epoch does), packed into micro-batches of
    --micro_batch_size released rows."""
    g = torch.Generator().manual_seed(runs.example_seed(args.seed, "epoch", epoch))  # a resume redraws it
    return pack(torch.randperm(len(items), generator=g).tolist(), [it["rows"] for it in items], args.micro_batch_size)


def micro_batches(plan, step, accum, dist):
    """This rank's `accum` micro-batches for optimizer step `step`. plan: per epoch, its micro-batches.

    A global batch is world_size x accum consecutive micro-batches (batch_size released rows; a tail
    that fills no global batch is dropped, drop_last); rank r takes micro-batches r*accum ...
    r*accum + accum - 1 of it. The micro-batches do not depend on the number of processes, so the
    global batches are the same for any number of processes, and a resume needs only the step."""
    per_global = accum * dist.world_size
    for epoch in plan:
        if step < len(epoch) // per_global:
            first = step * per_global + dist.rank * accum
            return epoch[first: first + accum]
        step -= len(epoch) // per_global  # the step's index within the later epochs
    raise IndexError(f"step {step} is past the end of the plan")


# ---- DataLoader workers: the videos of the next micro-batches, decoded in other processes ----
def video_loader(items, plan, start, stop, accum, args, dist):
    """A DataLoader over this rank's micro-batches of steps start ... stop - 1, in order, each as
    load_videos' (batch, paths, frames), decoded by --num_workers processes ahead of the training."""
    return torch.utils.data.DataLoader(
        # batch_sampler: the micro-batches in training order, each a list of positions in `items`
        items, batch_sampler=[mb for s in range(start, stop) for mb in micro_batches(plan, s, accum, dist)],
        collate_fn=functools.partial(load_videos, args=args, cache={} if args.cache_videos else None),
        num_workers=args.num_workers,  # 0: decoded in this process, between micro-steps
        worker_init_fn=functools.partial(die_with, os.getpid()))


def load_videos(batch, args, cache=None):
    """DataLoader collate (runs in a worker): decode each distinct video of a micro-batch once; with
    a `cache` (a dict: --cache_videos) each video only the first time this process meets it. A video
    that cannot be decoded comes back as its UserError in place of the frames (micro_step raises it):
    raised in a worker, it would reach the training process wrapped in the worker's traceback."""
    # V^r of every item, then every twin V^s (Table 5's "ALL": one per generator), each with its row
    where = {p: r for r in reversed(batch) for p in [r["real"]] + [syn for syn, _ in twins(r)]}
    paths = list(dict.fromkeys([r["real"] for r in batch] + [syn for r in batch for syn, _ in twins(r)]))
    frames = {} if cache is None else cache  # without a cache: this micro-batch's videos alone
    try:
        for p in paths:
            if p not in frames:
                frames[p] = decode(p, where[p], args)
    except common.UserError as e:
        return batch, paths, e
    return batch, paths, [frames[p] for p in paths]


def decode(path, item, args):
    """video_io.read_video, where a video that cannot be read stops the run as a user's error naming
    the row of `item` (its file and line)."""
    try:
        return video_io.read_video(path, args.num_frames, args.frame_sampling)
    except (OSError, ValueError) as e:  # read_video names the file and what failed
        raise common.UserError(f"{item['file']}:{item['line']}: {e}") from None


def die_with(parent, worker_id):
    """DataLoader worker_init_fn: the kernel ends this worker when the training process dies, even
    by SIGKILL (Linux prctl PR_SET_PDEATHSIG). Without it, workers outlived a killed run (~0.5 GB
    each): PyTorch's own parent check does not reach a worker that is stuck elsewhere."""
    if sys.platform.startswith("linux"):
        import ctypes
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the training process died before prctl took effect
        os._exit(1)


# ---- the training loop's steps ----
def print_data(items, skipped, total, accum, args, dist):
    """One printed line: what trains (triplets, those without a twin, explanations), what is skipped,
    by problem (each row once: the reader's, a missing video, a prompt too long), and the global
    batches. skipped: the rows not trained on and the triplets without a twin, as skipped.csv lists them."""
    triplets = [r for r in items if r["kind"] == "triplet"]
    no_twin = sum(r["syn"] is None for r in triplets) if args.use_syn else 0  # listed in skipped.csv too
    problems = Counter(s["reason"].split(":")[0] for s in skipped if not s["reason"].startswith(NO_TWIN))
    by_problem = f" ({', '.join(f'{k}: {n}' for k, n in sorted(problems.items()))})" if problems else ""
    but = " but the twins --syn_types leaves out" if args.syn_types else ""  # Table 2's are not skipped
    runs.print0(f"{len(triplets)} triplets ({no_twin} without a twin, trained on L_real alone) and "
                  f"{len(items) - len(triplets)} explanations; {sum(problems.values())} rows skipped{by_problem}"
                  f"; all listed in skipped.csv{but}. {runs.plural(total, 'step')} of {args.batch_size} rows = "
                  f"{runs.plural(dist.world_size, 'process')} x {runs.plural(accum, 'micro-batch')} x {args.micro_batch_size}")


def micro_step(loss_fn, ddp_model, processor, loaded, step, last, accum, args, dist):
    """One micro-batch's forward (every pair in one call, then loss_fn) and backward of loss / accum.
    loaded: load_videos' (batch, paths, frames); last: the step's last micro-batch, whose backward
    all-reduces the gradients. Returns the TERMS' values, (len(TERMS),) float32, detached."""
    batch, paths, frames = loaded
    if isinstance(frames, common.UserError):  # a video of the micro-batch could not be decoded (load_videos)
        raise frames
    # the LoRA dropout's seed comes from the step and the rows, not the process: any rank count draws the same
    torch.manual_seed(runs.example_seed(args.seed, step, *[(r["kind"], r["line"]) for r in batch]))
    # gradients are all-reduced only in the last micro-step's backward; the others accumulate locally
    with contextlib.nullcontext() if dist.world_size == 1 or last else ddp_model.no_sync():
        # bf16 on GPU (--bf16); Eq. (1)'s logits are computed in float32 all the same (shared_prefix.answer_logits)
        with torch.autocast("cuda", torch.bfloat16, enabled=dist.device.startswith("cuda") and args.bf16):
            terms = loss_fn(micro_batch_pairs(ddp_model, processor, batch, paths, frames, args), batch, args)
        if not all(torch.isfinite(v) for v in terms.values()):  # stop at once, naming the rows to look at
            raise FloatingPointError(
                f"step {step + 1}: non-finite loss {({k: v.item() for k, v in terms.items()})} on "
                f"lines {[(r['kind'], r['line']) for r in batch]} of {csv_names(args)} / {args.feedback_csv} "
                f"(videos {paths})")
        (terms["loss"] / accum).backward()  # the step's gradient: the mean over its micro-batches
    return torch.stack([terms[k].detach().float() for k in TERMS])


def log_step(sums, step, lr, grad_norm, t0, accum, args, dist):
    """Average each of TERMS over the global batch (every process and micro-step); rank 0 appends the
    line to log.jsonl and prints it. sums: this process's sums over its micro-steps, (len(TERMS),)."""
    if dist.world_size > 1:
        torch.distributed.all_reduce(sums)  # sum over the processes
    sums /= accum * dist.world_size  # the sums over all micro-batches of the step -> their means
    if dist.master:
        line = dict(step=step + 1, **dict(zip(TERMS, sums.tolist())), lr=lr,
                    grad_norm=grad_norm.item(), rows_per_s=args.batch_size / (time.time() - t0))
        path = os.path.join(args.out_dir, "log.jsonl")
        with disk.naming_write_errors(path), open(path, "a", encoding="utf-8") as fh:  # a full disk names it
            fh.write(json.dumps(line) + "\n")  # a line cut by a kill or a full disk: resume_log drops it
        runs.print0(" ".join(f"{k} {v:.4g}" for k, v in line.items()))


# ---- out_dir: settings, checkpoints (LoRA weights, optimizer, scheduler, step), the adapter ----
def checkpoint_settings(args, items):
    """What a checkpoint is made with: every setting that changes the weights (not RUN_ONLY), the
    CSVs' content (sha256; one per --train_csv, in order) and the item count. --resume refuses a
    checkpoint with other settings."""
    # the CSVs by content, not by path: a changed weight column must not resume an older run
    hashes = [disk.file_hash(path) for path in args.train_csv]  # another list of CSVs is another run
    settings = {**asdict(args), "train_csv": hashes[0] if len(hashes) == 1 else hashes, "items": len(items),
                "feedback_csv": disk.file_hash(args.feedback_csv) if args.feedback_csv else ""}
    if not args.syn_types:  # as a checkpoint written before --syn_types existed records it: absent
        del settings["syn_types"]
    return {k: v for k, v in settings.items() if k not in RUN_ONLY}


RUN_FILES = ("adapter", "log.jsonl", "checkpoints/step_*.pt")  # what shows that out_dir holds a run


def check_out_dir(args):
    """Refuse a new run (no --resume) in a folder that holds a run: its adapter, log or checkpoint
    would be mixed with, or replaced by, a run that may yet stop on a bad input. Nothing is touched."""
    found = [name for name in RUN_FILES if glob.glob(os.path.join(glob.escape(args.out_dir), name))]
    if found and not args.resume:
        raise common.UserError(f"{args.out_dir} holds a run ({', '.join(found)}): pass --resume to continue it, "
                               f"another --out_dir, or delete it")


def start_out_dir(args, skipped, start, dist):
    """Rank 0, only once every check has passed and the model has loaded (so that a bad flag or input
    touches nothing): writes args.json and skipped.csv, and keeps the log lines up to step `start`
    (a resumed run: those after it are logged again; the lines a killed run wrote after its checkpoint)."""
    if not dist.master:
        return
    log_path = os.path.join(args.out_dir, "log.jsonl")
    logged = resume_log(log_path) if os.path.exists(log_path) else None  # read first: a bad line writes nothing
    os.makedirs(args.out_dir, exist_ok=True)
    record = asdict(args)  # Args(**record) gives these settings back
    if len(args.train_csv) == 1:  # one CSV as a path, as args.json held it before --train_csv took several
        record["train_csv"] = args.train_csv[0]
    disk.save_json(os.path.join(args.out_dir, "args.json"), record)
    disk.write_csv(os.path.join(args.out_dir, "skipped.csv"), skipped, ["file", "line", "videopath", "reason"])
    if logged is not None:  # every kept line ends with a newline, so the next step appends a line of its own
        with disk.atomic_path(log_path) as tmp, open(tmp, "w", encoding="utf-8") as fh:
            fh.writelines(text + "\n" for step, text in logged if step <= start)


def resume_log(path):
    """log.jsonl's lines as [(step, text)]. A last line cut short (a kill or a full disk mid-write) is
    dropped, named in one printed line; a line before it that is not a log line stops the run, naming
    log.jsonl:line (it was not cut by a write: the file was changed)."""
    lines = open(path, encoding="utf-8", errors="replace").read().splitlines()
    logged = []
    for n, text in enumerate(lines, 1):
        try:
            logged.append((json.loads(text)["step"], text))
        except (ValueError, KeyError, TypeError):
            if n < len(lines):
                raise common.UserError(f"{path}:{n}: not a line of this log ({text[:40]!r}); delete that line, "
                                       f"or pass another --out_dir") from None
            runs.print0(f"{path}:{n}: its last line was cut short (a kill or a full disk?); dropped: {text[:40]!r}")
    return logged


def save_checkpoint(args, step, settings, model, optimizer, scheduler):
    """Write out_dir/checkpoints/step_NNNNNNN.pt atomically, then delete the older ones."""
    path = os.path.join(args.out_dir, "checkpoints", f"step_{step:07d}.pt")
    lora = {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad}
    with disk.atomic_path(path) as tmp:  # the key "plan" holds the settings (the name older checkpoints use)
        torch.save(dict(step=step, plan=settings, lora=lora, optimizer=optimizer.state_dict(),
                        scheduler=scheduler.state_dict()), tmp)
    for old in glob.glob(os.path.join(args.out_dir, "checkpoints", "step_*.pt")):
        if old != path:
            os.remove(old)  # only the latest is kept (a LoRA + AdamW state of a 7B model is ~1 GB)


def load_checkpoint(args, settings, model, optimizer, scheduler):
    """Restore the latest checkpoint; returns the step to continue from (0 if there is none).

    No RNG state needs restoring: the only randomness after the LoRA initialisation is the LoRA
    dropout, reseeded at every micro-step from (seed, step, rows), and the epoch shuffles, seeded
    from (seed, epoch); the data position is the step number itself."""
    paths = sorted(glob.glob(os.path.join(args.out_dir, "checkpoints", "step_*.pt")))
    if not paths:
        runs.print0(f"--resume: no checkpoint in {args.out_dir}/checkpoints, starting from step 0")
        return 0
    state = torch.load(paths[-1], map_location="cpu", weights_only=True)
    if differ := disk.settings_diff(state["plan"], settings):  # else the weights would mix two set-ups
        raise common.UserError(f"{paths[-1]}: written with other settings ({differ}); resume with the same settings")
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:  # only the LoRA weights are saved; the frozen rest comes from --model
                p.copy_(state["lora"][n])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    runs.print0(f"resumed from {paths[-1]} (step {state['step']})")
    return state["step"]


def save_adapter(args, model, dist):
    """Rank 0: the LoRA adapter (peft save_pretrained) written aside, then renamed to out_dir/adapter
    (disk.atomic_path), so that no reader meets half an adapter and a full disk keeps the old one."""
    if not dist.master:
        return
    final = os.path.join(args.out_dir, "adapter")
    with disk.atomic_path(final) as tmp:
        model.save_pretrained(tmp)
    runs.print0(f"saved {final}")


if __name__ == "__main__":
    runs.run_stage(main, Args)  # a user's mistake: `error: ...`, exit 2
