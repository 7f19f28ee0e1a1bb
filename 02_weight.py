r"""02_weight.py: the VQAScore ensemble fbar and the weight phi of every synthetic video.

Implements §4 (Fig. 2) and §5 Eq. (4) / Table 4 of Zanella et al., CVPR 2025: a synthetic video V^s (made from
t^s) is weighed by how much better it shows t^s than t^r: w = phi = max(0, fbar(V^s,t^s) - fbar(V^s,t^r)), Eq. (4).
fbar(V, t) = the mean over 3 image VQA models of their VQAScore (Lin et al. 2024), P("Yes" | frame,
'Does this figure show "<t>"? Please answer yes or no.'), averaged over 4 uniformly sampled frames of V.
By default phi is Table 4's row 3, fbar(V^s,t^s) (1 - fbar(V^s,t^r)), which §6.2 used for Video-LLaVA
(--weighting difference: Eq. 4, used for mPLUG-Owl). The authors never released this stage.

Reads   <dir>/generated.csv        01_generate.py's: input columns + syn_video (relative to <dir>) + seed
Writes  <dir>/weighted.csv         the same + vqascore_{target,real}_<member>, score_syn_target = fbar(V^s,t^s),
                                   score_syn_real = fbar(V^s,t^r), weight (all empty if V^s could not be scored)
        <dir>/weighted_fig2.png    Fig. 2 (--fig2_only: over several runs' weighted.csv); <dir>/weighted.json
        <dir>/weighted_gallery.html  V^s beside V^r, captions, fbar and phi, per type (opens from disk)
        <dir>/weighted_skipped.csv the rows kept without a weight or left out as bad: line, why (if any)
        <dir>/weighted_cache/      per-frame scores per member and rank: a killed or repeated run resumes

Launch (one GPU holds one model at a time; more GPUs split the videos; a CPU-sized run: README):
    python 02_weight.py --generated_csv runs/generate/generated.csv --video_root data/videos
    torchrun --standalone --nproc_per_node 4 02_weight.py --generated_csv runs/generate/generated.csv
"""
import os
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch

from common import WEIGHTINGS
from synvita import clip_t5, disk, fig2, gallery, runs, score_cache, vqa

# §4's question, VQAScore's (Lin et al. 2024): 'Does this figure show "<t>"? Please answer yes or no.', in
# each member's own prompt format (synvita/vqa.py, which builds the prompts, holds it)
VQA_QUESTION = vqa.VQA_QUESTION
# §4's ensemble. The paper names the models, not their sizes: these are the sizes t2v_metrics uses by
# default; ~25 GB each in bfloat16, loaded one at a time. CLIP-FlanT5 has no transformers class: it is
# rebuilt from transformers' parts (synvita/clip_t5.py).
PAPER_ENSEMBLE = [
    "Salesforce/instructblip-flan-t5-xxl",  # InstructBLIP-FlanT5 (Dai et al. 2023)
    "zhiqiulin/clip-flant5-xxl",  # CLIP-FlanT5 (Lin et al. 2024, VQAScore's own model)
    "llava-hf/llava-1.5-13b-hf",  # LLaVA-1.5 (Liu et al. 2024)
]
# Fig. 2's mean of fbar(V^s,t^s) - fbar(V^s,t^r) per misalignment type, printed beside ours (synvita/
# fig2.py, which the gallery reads too, holds it): flip -0.03, hallucination -0.05, action +0.09, ...
PAPER_FIG2_MEANS = fig2.PAPER_FIG2_MEANS
REQUIRED = ("videopath", "caption", "neg_caption", "misalignment", "syn_video")  # generated.csv's columns read here


@dataclass
class Args:
    generated_csv: str = ""
    """01_generate.py's CSV: input columns + syn_video (relative to this CSV's folder) + seed"""
    out_csv: str = ""
    """output CSV; default: weighted.csv next to --generated_csv (figure, JSON and cache beside it)"""
    models: list = field(default_factory=lambda: list(PAPER_ENSEMBLE))
    """the VQA ensemble of fbar in Eq. (4): hub ids or local folders of transformers image-text models
    or of CLIP-FlanT5 checkpoints (BLIP-2, e.g. Salesforce/blip2-flan-t5-xl, works too)"""
    num_frames: int = 4
    """frames of V^s sampled uniformly; fbar averages the VQAScore over them"""
    vqascore: Literal["first_token", "t2v_metrics"] = "first_token"
    """first_token: P(first answer token), VQAScore as its paper writes it; t2v_metrics:
    exp(-mean cross-entropy) over the answer's tokens + end token, as VQAScore's code computes it"""
    weighting: Literal[tuple(WEIGHTINGS)] = "target_x_inv_real"
    """phi, a key of common.WEIGHTINGS (Table 4): "target_x_inv_real" = row 3, fbar(Vs,ts) (1 - fbar(Vs,tr)),
    which §6.2 used for Video-LLaVA, the default model; "difference" = Eq. (4), used for mPLUG-Owl"""
    split: str = "train"
    """weigh only rows of this `split` when the CSV has that column ("" = all rows)"""
    pairs_per_forward: int = 8
    """(frame, caption) pairs per forward pass: 8 = a video's 4 frames x 2 captions at once; a frame's two
    captions share its encoding, so they always go together (1 acts as 2: one frame a call)"""
    strict: bool = False
    """stop at the first row that cannot be scored, instead of keeping it without a weight and counting it"""
    video_root: str = ""
    """where the real videos V^r are (the CSV's videopath below it): only the gallery reads them"""
    gallery: bool = True
    """write <out stem>_gallery.html: per misalignment type, the V^s with the highest, middle and lowest phi"""
    gallery_per_type: int = 3
    """the gallery's V^s per type and section (highest phi, middle, lowest phi)"""
    fig2_only: list = field(default_factory=list)
    """Fig. 2 alone, no model loaded: the weighted.csv of several runs (e.g. one per generator: the paper's
    Fig. 2 pools three), each row with its own run's scores; needs --out_csv, writes <its stem>_fig2.png, .json"""
    dist_timeout: int = runs.DIST_TIMEOUT
    """under torchrun: seconds without progress from another rank (its cache records) before rank 0 stops,
    naming what is missing (a lost node), and torch.distributed's timeout; more than one member's load"""
    # checked before any work (runs.check_numbers): every number above finite and >= 0 (0 as its
    # --help says), and these above 0
    POSITIVE = ("num_frames", "pairs_per_forward", "dist_timeout")


# ---- §4: the per-frame VQAScores of one synthetic video V^s, against t^s and t^r --------------------
def score_video(model, processor, frames, t_s, t_r, pairs_per_forward=8, vqascore="first_token"):
    """Per-frame VQAScores of (V^s, t^s) and (V^s, t^r): T frames x 2 captions = 2T pairs, by default
    one call, each frame encoded once for both captions (vqa.frame_scores; pairs_per_forward // 2 frames a
    call, at least one). frames: uint8 (T, H, W, 3). Returns two lists of T floats."""
    # a caption past the member's context is not scored (its scores would be silently wrong): the row is
    # kept without a weight, named and counted, like an undecodable V^s
    if overflow := vqa.past_context(model, processor, frames[0], {"neg_caption": t_s, "caption": t_r}, vqascore):
        raise ValueError(overflow)
    # row 0: the T frames against t^s, row 1: against t^r
    p = vqa.frame_scores(model, processor, frames, [t_s, t_r], max(1, pairs_per_forward // 2), vqascore)  # (2, T)
    # a NaN would pass through fbar and phi to a NaN weight: it is a failed row instead
    if not torch.isfinite(p).all():
        raise ValueError(f"non-finite VQAScore {p.tolist()}")
    return p[0].tolist(), p[1].tolist()


# ---- §5 Eq. (4): fbar and phi --------------------------------------------------------------------
#     fbar(V^s, t) = mean over members m of (1/T) sum_frames VQAScore_m(frame, t),   t = t^s or t^r
#     w = phi(fbar(V^s, t^s), fbar(V^s, t^r)),   phi = max(0, . - .) in Eq. (4), or a row of Table 4
def with_fbar(row, key, names, caches):
    """The row + each member's VQAScores averaged over frames (vqascore_{target,real}_<member>) + their
    mean over members: score_syn_target = fbar(V^s, t^s), score_syn_real = fbar(V^s, t^r)."""
    out = dict(row)  # generated.csv's columns unchanged, the scores appended
    for name, (done, _) in zip(names, caches):
        out[f"vqascore_target_{name}"] = float(np.mean(done[key]["target"]))  # mean over frames
        out[f"vqascore_real_{name}"] = float(np.mean(done[key]["real"]))
    out["score_syn_target"] = float(np.mean([out[f"vqascore_target_{n}"] for n in names]))  # fbar(Vs, ts)
    out["score_syn_real"] = float(np.mean([out[f"vqascore_real_{n}"] for n in names]))  # fbar(Vs, tr)
    return out


def weigh(rows, keys, names, caches, weighting):
    """Eq. (4) / Table 4: fbar and w = phi of every row that every member scored -> (every row, in order,
    with its scores and weight, or none where a member could not score its V^s; those rows again, each
    with a skip_reason naming each member's error)."""
    out, skipped = [], []
    for line, row, key in zip(rows.lines, rows, keys):
        # a row lacks fbar if any member failed on it (or, after a kill, never got to it)
        missing = [(n, failed.get(key, "not scored")) for n, (done, failed) in zip(names, caches) if key not in done]
        if missing:
            # kept, its score and weight cells empty: 03_train.py trains its real triplet (V^r, t^r, t^s)
            # on L_real alone ("trained without a twin"); dropped, the real triplet would be lost too
            out.append(dict(row))
            why = "; ".join(f"{n}: {e}" for n, e in missing)  # each member's error
            skipped.append({"line": line, **row, "skip_reason": f"kept without a weight: {why}"})
            continue
        out.append(with_fbar(row, key, names, caches))
    scored = [r for r in out if "score_syn_target" in r]  # the rows with fbar, which get a weight
    phi = WEIGHTINGS[weighting]  # Table 4 / Eq. (4), on all rows at once
    weights = phi(np.array([r["score_syn_target"] for r in scored]), np.array([r["score_syn_real"] for r in scored]))
    # a phi that returns a scalar (a constant) gives that weight to every row
    weights = np.broadcast_to(np.asarray(weights, dtype=float), (len(scored),))
    if bad := [(r["syn_video"], w) for r, w in zip(scored, weights) if not 0 <= w <= 1]:  # nan too: 03 refuses them
        raise runs.UserError(f"--weighting {weighting}: phi = {bad[0][1]:.3g} for {bad[0][0]} ({len(bad)} row(s)); "
                             f"Eq. (5) weighs L_syn by a phi in [0, 1]: clip it in common.WEIGHTINGS")
    for r, w in zip(scored, weights):
        r["weight"] = float(w)  # w in Eq. (5)'s weighted L_syn (03_train.py)
    return out, skipped


def write_weighted(out_csv, stem, rows, names, weighted, skipped):
    """weighted.csv (generated.csv's columns + each member's scores + fbar twice + weight; a row without
    scores has those cells empty) and the skip list: those rows, then the bad rows disk.read_csv left
    out (rows.skipped: a wrong field count, an empty text, an exact duplicate), each with its line."""
    columns = list(rows[0]) if rows else list(REQUIRED)  # generated.csv's own columns (REQUIRED if no row)
    scores = [f"vqascore_{s}_{n}" for n in names for s in ("target", "real")]
    disk.write_csv(out_csv, weighted, columns + scores + ["score_syn_target", "score_syn_real", "weight"])  # missing: ""
    bad = [{"line": line, "skip_reason": f"left out: {kind}"} for kind, lines in rows.skipped.items() for line in lines]
    listed = sorted(skipped + bad, key=lambda r: r["line"])  # in file order, each row once
    if listed:
        disk.write_csv(stem + "_skipped.csv", listed, ["line", *columns, "skip_reason"])
    elif os.path.exists(stem + "_skipped.csv"):  # an earlier run's list, now scored
        os.remove(stem + "_skipped.csv")
    # one count of each: this line, <stem>.json's kept_without_weight and bad_rows_skipped, the skip list's rows
    runs.print0(f"wrote {out_csv}: {len(weighted) - len(skipped)} rows weighted; {len(skipped)} kept without a weight "
                f"(their V^s could not be scored); {len(bad)} bad rows skipped"
                + (f"; each listed with the reason in {stem}_skipped.csv" if listed else ""))
    return len(bad)


# ---- §4 Fig. 2: distribution of fbar(V^s,t^s) - fbar(V^s,t^r) per misalignment type ---------------
# In the paper's Fig. 2 the mean is below 0 for flip and hallucination: the ensemble rates V^s as
# showing t^r better than its own t^s (PAPER_FIG2_MEANS).
def fig2_table(rows):
    """{misalignment type: {n, mean, std}} of fbar(V^s,t^s) - fbar(V^s,t^r)."""
    by_type = {}
    for r in rows:  # a row without a type counts under "(none)"
        by_type.setdefault(r["misalignment"] or "(none)", []).append(r["score_syn_target"] - r["score_syn_real"])
    return {k: {"n": len(v), "mean": float(np.mean(v)), "std": float(np.std(v))} for k, v in sorted(by_type.items())}


def report_fig2(args, scored, stem, counts):
    """Fig. 2's table (ours beside the paper's means) printed, its histograms to <stem>_fig2.png, and
    <stem>.json: the settings, the table and `counts` (how many rows were weighted, kept without a weight)."""
    table = fig2_table(scored)
    runs.print0(f"{'misalignment':<16}{'n':>6}{'mean':>9}{'std':>8}{'paper mean':>12}")
    for kind, s in table.items():
        paper = PAPER_FIG2_MEANS.get(kind)  # None for a type the paper has not ("(none)", a new one)
        runs.print0(f"{kind:<16}{s['n']:>6}{s['mean']:>+9.3f}{s['std']:>8.3f}{'' if paper is None else f'{paper:+.2f}':>12}")
    fig2.save_figure_and_json(args, scored, table, stem, counts)  # the PNG (if a row has scores), the JSON
    return table


def main(args):
    """§4's VQAScores, Eq. (4)'s weights, Fig. 2. Returns weighted.csv's path on rank 0, None on the others
    (--fig2_only: Fig. 2 of existing weighted.csv files, no model; the path of its JSON)."""
    if args.fig2_only:  # Fig. 2 over several runs (the paper's three generators): read, not scored
        scored, stem, files = fig2.pool_runs(args)  # every scored row of every file, each with its run's fbar
        report_fig2(args, scored, stem, {"weighted": len(scored), "files": files})
        return stem + ".json"
    dist = runs.setup_distributed(timeout=args.dist_timeout)
    # ---- the flags, the members and the input, all checked before anything is read or written ----
    names, out_csv = score_cache.check_flags(args)  # members' columns; no output is an input, however named
    found = clip_t5.find_members(args.models)  # every member found (seconds) before any loads, all missing named
    # one row per V^s (syn_video), with t^s and t^r; --split's only (never 04's); an older 02 output's scores dropped
    rows = disk.read_csv(args.generated_csv, required=REQUIRED, texts=("caption", "neg_caption", "syn_video"))
    rows = score_cache.without_old_scores(disk.keep_split(rows, args.split, args.generated_csv), args.generated_csv)
    root = os.path.dirname(os.path.abspath(args.generated_csv))  # syn_video is relative to the CSV's folder
    stem = os.path.splitext(out_csv)[0]  # <dir>/weighted: the JSON, figure, skip list and cache share it
    cache = stem + "_cache"
    keys, first = score_cache.row_keys(rows)  # (V^s, t^s, t^r) of each row; the first row of each: scored once

    # ---- resume: what each member's cache already holds (its settings checked first) ----
    todo = score_cache.resume(args, names, cache, first, dist)  # row indices left to score, per member
    runs.print0(f"{len(rows)} rows, {len(first)} synthetic videos; to score per model: "
                + ", ".join(f"{n} {len(t)}" for n, t in zip(names, todo)))

    # ---- §4: per-frame VQAScores of (V^s, t^s) and (V^s, t^r), every member, sharded over ranks ----
    score_cache.score_ensemble(args, rows, keys, names, found, todo, root, cache, dist, score_video)
    if not score_cache.all_ranks_finished(cache, dist):
        return None  # rank 0 alone merges

    # ---- §5 Eq. (4): fbar and phi, from every rank's cache ----
    caches = [score_cache.read_cache(os.path.join(cache, name)) for name in names]
    weighted, skipped = weigh(rows, keys, names, caches, args.weighting)  # every row; those without a weight
    if len(skipped) == len(weighted):  # nothing usable: an error, and no record that refuses the rerun
        score_cache.refuse_empty_run(args, names, cache, caches, skipped)
    bad = write_weighted(out_csv, stem, rows, names, weighted, skipped)

    # ---- §4 Fig. 2 and its table of means, over the rows with scores ----
    table = report_fig2(args, [r for r in weighted if "weight" in r], stem, {
        "weighted": len(weighted) - len(skipped), "kept_without_weight": len(skipped), "bad_rows_skipped": bad})
    if args.gallery:  # Fig. 2 to look at: each V^s beside V^r, its captions, fbar and phi
        gallery.write_gallery(args, out_csv, names, root, table)
    return out_csv


if __name__ == "__main__":
    runs.run_stage(main, Args)  # a user's mistake: `error: ...`, exit 2
