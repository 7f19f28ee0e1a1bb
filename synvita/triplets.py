"""The training items of 03_train.py (§6 data): the triplets (V^r, t^r, t^s) of --train_csv with their
synthetic twins V^s = G(t^s) and weights w = phi (§5 Eq. 4 / Table 4, in [0, 1]), Table 2's
--syn_types, Table 5's "ALL" (several CSVs merged by the real triplet, a twin from each), and
VideoCon's explanation (NLE) rows; every flag and input checked before anything is loaded or written."""
import math
import os
from collections import Counter
from dataclasses import fields
from typing import Literal, get_args, get_origin

import numpy as np

from common import WEIGHTINGS
from synvita import disk, runs
from synvita.runs import UserError

# A training item is a dict. A triplet: kind "triplet", line (its line in the first CSV that lists
# it), real (V^r's path), caption (t^r), neg (t^s), syn (V^s's path; None: trained without a twin),
# w (phi; 0 without a twin), rows = 2, and, only where later --train_csv files add twins (Table 5's
# "ALL"), more_twins = [(V^s's path, phi), ...] (twins() lists them all) and more_rows = [(file,
# line), ...], the later CSVs' rows merged into it (each skipped with it). An explanation: kind "nle",
# line, real, neg (the t^s it explains), nle (its text), rows = 1. Rows are counted as the released
# code counts them: a triplet is TWO rows, its Yes row (V^r, t^r) and its No row (V^r, t^s), each
# with its twin; an explanation is ONE. --batch_size and --micro_batch_size count these rows. A
# triplet with k twins is still 2 rows: its forward pass grows with k (3 more pairs a twin).
NO_TWIN = "trained without a twin: "  # skipped.csv's reason for a row whose twin V^s is not used


def number(cell):
    """A CSV cell as a float: NaN if empty (02's unscored V^s: the triplet trains without its twin,
    counted); None if it is no number ("0,5", "high", and "nan", which 02 never writes: phi_weights
    names it)."""
    try:
        value = float(cell) if cell.strip() else float("nan")
    except ValueError:
        return None
    return None if cell.strip() and math.isnan(value) else value


def load_triplets(args):
    """The CSV rows as triplets with absolute video paths and the weight w = phi in [0, 1]. A row
    whose real video is missing is a counted skip. A row whose twin cannot be used (no syn_video,
    its file missing, an empty weight or score) trains on L_real alone, its synthetic terms 0, as
    the released code trains such rows; it is counted and listed too. Both go to skipped.csv with the
    reason. A weight outside [0, 1] and one V^s with two weights stop the run (phi_weights,
    refuse_two_weights), as a video that exists but cannot be decoded does later.
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
            elif by_key[key]:  # a later CSV's row of it: skipped with it if its prompt is too long
                by_key[key].setdefault("more_rows", []).append((path, rows.lines[i]))
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
        raise UserError(f"--syn_types {unknown}: no row of {csv_names(args)} has this misalignment; "
                        f"its types: {sorted(types)}")
    if not keep:
        raise UserError(f"{csv_names(args)}: no row can be trained on "
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
    """Refuse flag values that cannot work (every choice flag and number: argparse and
    runs.check_numbers refuse them on the command line, this check when main(args) is called from
    Python) and an --out_dir that is an input or runs through a file, before anything is loaded or
    written; returns the columns that phi is read from: 02_weight.py's `weight`, none for w = 1, or
    the two VQAScores it is computed from."""
    for f in fields(args):  # --prompt, --answer_loss, --weighting, --frame_sampling
        if get_origin(f.type) is Literal and getattr(args, f.name) not in get_args(f.type):
            raise UserError(f"--{f.name} {getattr(args, f.name)!r}: use one of {list(get_args(f.type))}")
    runs.check_numbers(args, type(args).POSITIVE)  # finite, >= 0, and > 0 where a count or a rate
    if args.lora_dropout >= 1:  # nn.Dropout(p=1) zeroes every LoRA input: nothing would train
        raise UserError(f"--lora_dropout {args.lora_dropout}: give a probability below 1 (the paper's: 0.05)")
    disk.check_outputs({"--out_dir": args.out_dir}, {"--train_csv": args.train_csv, "--feedback_csv": args.feedback_csv,
                                                     "--video_root": args.video_root, "--model": args.model})
    if not args.train_csv:  # `--train_csv` with no file after it
        raise UserError("--train_csv: give one CSV, or one per generator (Table 5's \"ALL\")")
    if args.syn_types and not args.use_syn:  # the VideoCon baseline has no twin to pick
        raise UserError(f"--syn_types {args.syn_types} picks synthetic twins: it needs --use_syn")
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
    w = phi_weights(rows, scores, args, path)
    if args.use_syn:
        refuse_two_weights(rows, w, path)
    return rows, w


def refuse_two_weights(rows, w, path):
    """One V^s has one phi: the same triplet (videopath, caption, neg_caption) with the same syn_video
    on two rows of one CSV with different weights (an empty one included) is a contradiction, not a
    repeated caption; which phi is right is not ours to guess, so the run stops, naming both lines.
    The same twin with the same weight trains on each row, as a repeated caption does."""
    first = {}  # (triplet, syn_video) -> (its first line, its phi)
    for line, r, phi in zip(rows.lines, rows, w):
        if not r["syn_video"]:  # no twin: no weight is read
            continue
        seen, phi0 = first.setdefault((r["videopath"], r["caption"], r["neg_caption"], r["syn_video"]), (line, phi))
        if phi != phi0 and not (math.isnan(phi) and math.isnan(phi0)):
            here, there = ("empty" if math.isnan(v) else f"{v:g}" for v in (phi, phi0))
            raise UserError(f"{path}:{line}: the triplet and syn_video of line {seen} with another weight "
                            f"({here} here, {there} there): one V^s has one phi; keep one of the two rows")


def reader_skips(rows, path):
    """disk.read_csv's skipped rows (Rows.skipped: {problem: [lines]}) as skipped.csv's entries."""
    return [dict(file=path, line=line, videopath="", reason=problem)  # the reader keeps no cell of a bad row
            for problem, lines in rows.skipped.items() for line in lines]


def new_triplet(r, path, line, args):
    """CSV row r (line `line` of `path`) as a triplet item, its twin not yet added (None if its real
    video V^r is missing)."""
    real = os.path.join(args.video_root, r["videopath"])  # V^r
    if not os.path.isfile(real):  # without V^r not even L_real can be trained: a counted skip
        return None
    # t^r = caption, t^s = neg_caption; w = 0 until a twin is added: its synthetic terms are then exactly 0
    return dict(kind="triplet", file=path, line=line, real=real, caption=r["caption"], neg=r["neg_caption"],
                syn=None, w=0.0, rows=2)


def add_twin(t, r, w, path):
    """Add CSV row r's twin V^s (syn_video, relative to the CSV's folder unless absolute) with its weight w
    = phi to triplet t: the first in syn and w, those of later CSVs in more_twins. Returns why the row's
    twin cannot be used ('' if it is used)."""
    # syn_video is relative to its CSV's folder, as 01_generate.py writes it: a moved run folder still finds V^s
    syn = os.path.join(os.path.dirname(os.path.abspath(path)), r["syn_video"]) if r["syn_video"] else ""
    if no_twin := why_no_twin(syn, w):  # the triplet keeps L_real; the reason goes to skipped.csv
        return no_twin
    if t["syn"] is None:  # the first usable twin, whichever CSV gives it
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
    """§5 Eq. (4) / Table 4: each row's weight w = phi(V^s, t^s, t^r) (NaN where a needed cell is
    empty). --weighting csv reads 02_weight.py's `weight`; a WEIGHTINGS name recomputes it from
    fbar(V^s, t^s) and fbar(V^s, t^r), clamped at 0; 'fixed' (and --no-use_syn) is w = 1. A cell
    that is no number ("0,5", "nan") or lies outside [0, 1] (-0.5, -inf, 2) stops the run, naming
    its line: every phi of 02 and every VQAScore lies in [0, 1]."""
    for c in scores:  # a cell that is no number is a mistake, not a missing score
        if bad := next((line for line, r in zip(rows.lines, rows) if number(r[c]) is None), None):
            raise UserError(f"{path}:{bad}: {c} {rows[rows.lines.index(bad)][c]!r} is not a number")
    column = {c: np.array([number(r[c]) for r in rows]) for c in scores}  # (rows,) each
    for c in scores:  # VQAScores and phi lie in [0, 1] (an empty cell, NaN, is a counted skip in load_triplets)
        if bad := [(line, r[c]) for line, r, v in zip(rows.lines, rows, column[c])
                   if not 0 <= v <= 1 and not math.isnan(v)]:  # the first named, the others counted
            raise UserError(f"{path}:{bad[0][0]}: {c} {bad[0][1]} outside [0, 1]"
                            + (f" (and {len(bad) - 1} more row(s))" if len(bad) > 1 else ""))
    if not args.use_syn or args.weighting == "fixed":
        w = np.ones(len(rows))  # Eq. (3), unweighted
    elif args.weighting == "csv":
        w = column["weight"]
    else:
        ft, fr = column["score_syn_target"], column["score_syn_real"]  # fbar(V^s, t^s), fbar(V^s, t^r)
        w = np.where(np.isfinite(ft) & np.isfinite(fr), WEIGHTINGS[args.weighting](ft, fr), np.nan)
        w = np.maximum(w, 0.0)  # a student's WEIGHTINGS entry below 0: phi >= 0 (NaN stays NaN)
    return w


def why_no_twin(syn, w):
    """Why a triplet trains without its twin V^s, as the released code trains a row without a
    syn_video ('' if the twin is usable): syn is V^s's path ('' if none), w its weight phi."""
    if not syn:
        return "no syn_video"
    if not os.path.isfile(syn):
        return f"synthetic video not found: {syn}"
    if not math.isfinite(w):  # an empty weight (or score) cell: 02 could not weigh V^s
        return "weight is missing"
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
