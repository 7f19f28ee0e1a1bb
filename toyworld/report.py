"""The toy experiment's results: each row's metrics from 04_eval.py's outputs (with the column of
the negative-only concepts), the Fig. 2-style statistics of 02_weight.py's weights, the markdown
tables and the two figures (the main table, a panel per test set; Fig. 2)."""
import random

import numpy as np

from synvita.disk import read_csv
from synvita.fig2 import PAPER_FIG2_MEANS  # the paper's Fig. 2 means per type
from toyworld.generator import corrupt
from toyworld.world import TYPES, names_negative_only, parse_caption

# the table's columns: (title, key of row_results)
COLUMNS = [("VideoCon-like AUC", "auc"), ("negative-only concepts AUC", "negative_only_auc"),
           ("SSv2-T-like mAP", "mAP"), ("ATP-like acc", "accuracy")]


def auc(pos, neg):
    """ROC-AUC (%) of scores of positives vs negatives."""
    from sklearn.metrics import roc_auc_score
    return 100 * float(roc_auc_score([1] * len(pos) + [0] * len(neg), [*pos, *neg]))


def row_results(eval_dir, test_csv):
    """One row of the table from 04_eval.py's out_dir: its results.json metrics, and from its
    VideoCon-like scores the AUC per misalignment type and on the test rows whose positive caption
    names a negative-only concept (world.NEGATIVE_ONLY)."""
    import json
    import os
    with open(os.path.join(eval_dir, "results.json")) as fh:
        results = json.load(fh)["results"]
    score = {(r["videopath"], r["caption"]): float(r["score"]) for r in read_csv(os.path.join(eval_dir, "videocon_llm_scores.csv"))}
    test = read_csv(test_csv)

    def subset_auc(rows):
        return auc([score[r["videopath"], r["caption"]] for r in rows], [score[r["videopath"], r["neg_caption"]] for r in rows])
    return {"auc": results["videocon_llm"]["auc"], "mAP": results["ssv2_temporal"]["mAP"],
            "accuracy": results["atphard"]["accuracy"], "accuracy_T": results["atphard"]["accuracy_T"],
            "negative_only_auc": subset_auc([r for r in test if names_negative_only(r["caption"])]),
            "auc_by_type": {k: subset_auc(rows) for k in TYPES if (rows := [r for r in test if r["misalignment"] == k])}}


def fig2_stats(weighted_csv, generator_kwargs):
    """Per misalignment type, over 02_weight.py's rows: how many, the share that G drew faithfully
    (re-derived from each row's seed, exactly as ToyGenerator drew it), the mean fbar(Vs,ts) -
    fbar(Vs,tr) (paper Fig. 2), and the mean Eq. 4 weight of all, of the faithful and of the
    failed V^s."""
    rows = read_csv(weighted_csv)
    rates = generator_kwargs["failure_rates"]
    ok = [not corrupt(parse_caption(r["neg_caption"]), rates, random.Random(int(r["seed"])))[1] for r in rows]
    stats = {}
    for kind in TYPES:
        sel = [(float(r["weight"]), float(r["score_syn_target"]) - float(r["score_syn_real"]), f)
               for r, f in zip(rows, ok) if r["misalignment"] == kind]
        if sel:
            w, diff, f = map(np.array, zip(*sel))
            stats[kind] = {"n": len(sel), "faithful": float(f.mean()), "diff": float(diff.mean()), "w": float(w.mean()),
                           "w_faithful": float(w[f].mean()) if f.any() else float("nan"),
                           "w_failed": float(w[~f].mean()) if (~f).any() else float("nan")}
    return stats


def mean_std(values):
    v = [x for x in values if x is not None]
    return (float(np.mean(v)), float(np.std(v))) if v else (float("nan"), float("nan"))


def nan_mean(values):
    """The mean of the values that are not NaN (NaN if none is: e.g. no failed V^s of a faithful G)."""
    kept = [v for v in values if not np.isnan(v)]
    return float(np.mean(kept)) if kept else float("nan")


def tables(methods, per_seed, fig2s, differences=""):
    """The Table 3/4-style table (mean ± std over seeds), then `differences` (paired_table's), the
    AUC by type, and the Fig. 2-style table."""
    lines = [f"| method | {' | '.join(c for c, _ in COLUMNS)} |", "|---" * (len(COLUMNS) + 1) + "|"]
    cell = "{:6.2f} ± {:5.2f}" if len(per_seed) > 1 else "{:6.2f}"  # one seed: no spread to show
    for m in methods:
        cells = [cell.format(*mean_std([r[m][key] for r in per_seed])) for _, key in COLUMNS]
        lines.append(f"| {m} | {' | '.join(cells)} |")
    lines += ["", differences] if differences else []
    lines += ["", "VideoCon-like AUC by misalignment type (mean over seeds)", "",
              f"| method | {' | '.join(TYPES)} |", "|---" * (len(TYPES) + 1) + "|"]
    for m in methods:
        cells = [f"{mean_std([r[m]['auc_by_type'].get(k) for r in per_seed])[0]:5.1f}" for k in TYPES]
        lines.append(f"| {m} | {' | '.join(cells)} |")
    lines += ["", "Fig. 2-style, per type (mean over seeds): share of V^s drawn faithfully by G, mean fbar(Vs,ts) - "
              "fbar(Vs,tr) beside the paper's Fig. 2 mean, mean Eq. 4 weight of all, of the faithful and of the failed V^s", "",
              "| type | n | faithful | fbar diff | paper | w | w faithful | w failed |", "|---" * 8 + "|"]
    for kind in TYPES:
        stats = [f[kind] for f in fig2s if kind in f]
        if stats:
            m = {k: nan_mean([s[k] for s in stats]) for k in stats[0]}
            paper = f"{PAPER_FIG2_MEANS[kind]:+.2f}" if kind in PAPER_FIG2_MEANS else "-"
            lines.append(f"| {kind} | {m['n']:.0f} | {m['faithful']:.2f} | {m['diff']:+.3f} | {paper} | {m['w']:.3f} | "
                         f"{m['w_faithful']:.3f} | {m['w_failed']:.3f} |")
    return "\n".join(lines)


def paired(per_seed, row, reference, key):
    """row - reference on one metric, seed by seed: both rows of a seed share its world, its
    synthetic videos and its weights, so what the seeds change moves both and cancels here."""
    return [r[row][key] - r[reference][key] for r in per_seed]


def interval(diffs, level=0.95):
    """Mean, standard deviation and the two-sided t-interval of the mean of paired differences
    (Student's t with n - 1 degrees of freedom); no interval from a single seed."""
    from scipy.stats import t
    d = np.asarray(diffs, dtype=float)
    if len(d) < 2:
        return float(d.mean()), float("nan"), (float("nan"), float("nan"))
    sd = float(d.std(ddof=1))
    half = float(t.ppf((1 + level) / 2, len(d) - 1)) * sd / np.sqrt(len(d))
    return float(d.mean()), sd, (float(d.mean()) - half, float(d.mean()) + half)


def paired_table(comparisons, per_seed):
    """The claims as paired per-seed differences: a line per (row, reference, claim), a cell per
    metric: the mean difference ± its standard deviation over seeds, "✓" when the 95% t-interval
    of the mean is above 0, "✗" when it is below 0, nothing when it holds 0 (within the noise of
    these seeds). Also the per-seed differences, for results.json."""
    spread = (f"mean ± std over {len(per_seed)} seeds; ✓ / ✗: the 95% t-interval of the mean is above / below 0; no "
              "mark: these seeds cannot tell" if len(per_seed) > 1 else "one seed: no spread, no interval, no mark")
    lines = [f"Paired per-seed differences, row - reference ({spread})", "",
             f"| row | reference | claim | {' | '.join(c for c, _ in COLUMNS)} |", "|---" * (len(COLUMNS) + 3) + "|"]
    raw = {}
    for row, reference, claim in comparisons:
        cells = []
        for _, key in COLUMNS:
            diffs = paired(per_seed, row, reference, key)
            mean, sd, (low, high) = interval(diffs)
            raw[f"{row} - {reference}", key] = diffs
            mark = "✓" if low > 0 else "✗" if high < 0 else " "  # NaN bounds (one seed): no mark
            cells.append(f"{mean:+6.2f} ± {sd:4.2f} {mark}" if len(diffs) > 1 else f"{mean:+6.2f}")
        lines.append(f"| {row} | {reference} | {claim} | {' | '.join(cells)} |")
    return "\n".join(lines), {f"{name} | {key}": d for (name, key), d in raw.items()}


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt
    return plt


def plot_table(methods, per_seed, path, title):
    """The main table as a PNG: one panel per test set, a bar per method (mean over seeds, error bar
    = std over seeds)."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(COLUMNS), figsize=(3.6 * len(COLUMNS), 3.8), sharey=False)
    colours = plt.get_cmap("tab10").colors
    for ax, (name, key) in zip(axes, COLUMNS):
        stats = [mean_std([r[m][key] for r in per_seed]) for m in methods]
        ax.bar(range(len(methods)), [s[0] for s in stats], yerr=[s[1] for s in stats], capsize=3,
               color=[colours[i % 10] for i in range(len(methods))])
        low = min(s[0] - s[1] for s in stats)
        ax.set_ylim(max(0, low - 10), min(100, max(s[0] + s[1] for s in stats) + 3))
        ax.set_title(name, fontsize=10)
        ax.set_xticks(range(len(methods)), [str(i + 1) for i in range(len(methods))])
    fig.legend([plt.Rectangle((0, 0), 1, 1, color=colours[i % 10]) for i in range(len(methods))],
               [f"{i + 1}: {m}" for i, m in enumerate(methods)], loc="lower center", ncol=3, fontsize=8)
    fig.suptitle(f"{title}, mean ± std over {len(per_seed)} seeds" if len(per_seed) > 1 else f"{title}, one seed",
                 fontsize=10)
    fig.tight_layout(rect=(0, 0.05 + 0.04 * ((len(methods) + 2) // 3), 1, 0.95))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_fig2(fig2s, path, title):
    """Fig. 2 of the toy world as a PNG: per misalignment type, the mean fbar(Vs,ts) - fbar(Vs,tr)
    (error bar = std over seeds) beside the paper's Fig. 2 mean, and the mean Eq. 4 weight."""
    plt = _pyplot()
    kinds = [k for k in TYPES if any(k in f for f in fig2s)]
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(10, 3.6))
    x = np.arange(len(kinds))
    diff = [mean_std([f[k]["diff"] for f in fig2s if k in f]) for k in kinds]
    ax.bar(x - 0.2, [d[0] for d in diff], 0.4, yerr=[d[1] for d in diff], capsize=3, label="toy world")
    ax.bar(x + 0.2, [PAPER_FIG2_MEANS.get(k, np.nan) for k in kinds], 0.4, label="paper, Fig. 2")
    ax.axhline(0, color="black", linewidth=0.5)
    ax.set_title(r"mean $\bar f(V^s,t^s) - \bar f(V^s,t^r)$", fontsize=10)
    weight = [mean_std([f[k]["w"] for f in fig2s if k in f]) for k in kinds]
    bx.bar(x, [w[0] for w in weight], yerr=[w[1] for w in weight], capsize=3, color="tab:green")
    bx.set_title("mean weight phi (Eq. 4)", fontsize=10)
    for a in (ax, bx):
        a.set_xticks(x, kinds, rotation=30, fontsize=8)
    ax.legend(fontsize=8)
    fig.suptitle(f"{title}: Fig. 2, {len(fig2s)} seeds", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
