"""§4 Fig. 2 on disk: its histograms of fbar(V^s,t^s) - fbar(V^s,t^r) per misalignment type (PNG) and
<stem>.json (the settings, the table of means, the counts); and --fig2_only's input: the scored rows of
several runs' weighted.csv (the paper's Fig. 2 pools three generators), every cell checked. The table
itself, fig2_table, is 02_weight.py's."""
import os

import numpy as np

from synvita.disk import atomic_path, check_outputs, read_csv, save_json
from synvita.runs import UserError, print0

# Fig. 2's mean of fbar(V^s,t^s) - fbar(V^s,t^r) per misalignment type, printed beside ours (02_weight.py
# names it, and the gallery's header shows it): below 0 for flip and hallucination, where V^s shows t^r better
PAPER_FIG2_MEANS = {"flip": -0.03, "hallucination": -0.05, "action": 0.09, "attribute": 0.15, "object": 0.15}


# ---- §4 Fig. 2: one histogram of fbar(V^s,t^s) - fbar(V^s,t^r) per misalignment type ---------------
def plot_fig2(rows, table, path):
    """One histogram of fbar(V^s,t^s) - fbar(V^s,t^r) per misalignment type, written to `path` (PNG).
    table: 02_weight.fig2_table(rows), {type: {n, mean, std}}: a panel per type, its mean marked."""
    import matplotlib
    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt
    cols, nrows = min(4, len(table)), -(-len(table) // 4)  # ceil
    fig, axes = plt.subplots(nrows, cols, figsize=(3.2 * cols, 2.8 * nrows), squeeze=False)
    for ax in axes.flat[len(table):]:
        ax.axis("off")  # the grid's unused panels
    for ax, (kind, stats) in zip(axes.flat, table.items()):
        diffs = [r["score_syn_target"] - r["score_syn_real"] for r in rows if (r["misalignment"] or "(none)") == kind]
        ax.hist(diffs, bins=np.linspace(-1, 1, 41), color="tab:blue")  # bins of 0.05 over [-1, 1]
        ax.axvline(stats["mean"], color="tab:red", label=f"mean {stats['mean']:+.2f}")
        ax.axvline(0, color="black", linewidth=0.5)  # right of 0: V^s shows t^s better than t^r
        ax.set(title=f"{kind} (n={stats['n']})", xlabel=r"$\bar f(V^s,t^s) - \bar f(V^s,t^r)$",
               ylabel="synthetic videos")
        ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(path) as tmp:  # a full disk names the figure
        fig.savefig(tmp, dpi=120)
    plt.close(fig)


def save_figure_and_json(args, scored, table, stem, counts):
    """Fig. 2's histograms to <stem>_fig2.png (when a row has scores) and <stem>.json: the settings, the
    table (02_weight.fig2_table) and `counts` (how many rows were weighted, kept without a weight)."""
    if scored:
        plot_fig2(scored, table, stem + "_fig2.png")
    save_json(stem + ".json", {"args": vars(args), "fig2": table, **counts})


# ---- §4 Fig. 2 over several runs: the paper's is the mean over its three generators --------------
# --fig2_only reads each run's weighted.csv (fbar(V^s,t^s) and fbar(V^s,t^r) are there): no model is loaded
FIG2_COLUMNS = ("misalignment", "score_syn_target", "score_syn_real")  # what Fig. 2 reads of a weighted.csv


def fig2_scores(path, line, row):
    """A weighted.csv row as Fig. 2 reads it: {misalignment, score_syn_target, score_syn_real} as floats;
    None if both score cells are empty (02 kept the row without a weight). Any other cell that is not a
    VQAScore (a number in [0, 1]) is an error naming file:line."""
    cells = [row["score_syn_target"].strip(), row["score_syn_real"].strip()]  # fbar(Vs, ts), fbar(Vs, tr)
    if not any(cells):
        return None  # its V^s could not be scored: not part of Fig. 2
    try:
        ft, fr = map(float, cells)
    except ValueError:
        ft = fr = float("nan")  # caught just below, with the cells named
    if not (0 <= ft <= 1 and 0 <= fr <= 1):  # fbar is a mean of probabilities; NaN fails too
        raise UserError(f"{path}:{line}: score_syn_target {cells[0]!r}, score_syn_real {cells[1]!r}: "
                        "not two numbers in [0, 1]")
    return {"misalignment": row["misalignment"], "score_syn_target": ft, "score_syn_real": fr}


def check_pool(args):
    """--fig2_only's files, before any is read: each run once (by its real path: a symlink or ./x.csv is
    the same run, whose rows would count twice), and the pooled figure and JSON never written over a
    file given nor over a run's own (its weighted_fig2.png, weighted.json, however the path is spelled).
    -> the stem of --out_csv."""
    seen = {}  # real path -> the argument that named it first
    for path in args.fig2_only:
        if (first := seen.get(os.path.realpath(path))) is not None:
            raise UserError(f"--fig2_only {first} and {path} are the same file ({os.path.realpath(path)}): its rows "
                            "would count twice in Fig. 2; give each run's weighted.csv once")
        seen[os.path.realpath(path)] = path
    stem = os.path.splitext(args.out_csv)[0]
    # each run's own figure and JSON, beside the CSV as given and beside the file a symlink points to
    runs_stems = [os.path.splitext(p)[0] for path in args.fig2_only for p in (path, os.path.realpath(path))]
    check_outputs({"--out_csv (.json)": stem + ".json", "--out_csv (_fig2.png)": stem + "_fig2.png"},
                  {"--fig2_only": args.fig2_only, "--fig2_only (a run's .json)": [s + ".json" for s in runs_stems],
                   "--fig2_only (a run's _fig2.png)": [s + "_fig2.png" for s in runs_stems]})
    return stem


def pool_runs(args):
    """--fig2_only: the rows of Fig. 2 over the union of several runs' weighted.csv (e.g. one per
    generator), each row with its own run's scores; rows without scores are left out and counted.
    -> (the scored rows, <--out_csv stem>, where its _fig2.png and .json go, {file: counts})."""
    if not args.out_csv or args.generated_csv:
        raise UserError("--fig2_only needs --out_csv (the figure and JSON go beside it) and no --generated_csv")
    stem = check_pool(args)
    scored, files = [], {}
    for path in args.fig2_only:
        rows = read_csv(path, required=FIG2_COLUMNS)  # a file without the score columns: an error naming it
        mine = [fig2_scores(path, line, r) for line, r in zip(rows.lines, rows)]  # None: no scores
        scored += [r for r in mine if r is not None]  # the union: each row keeps its own run's fbar
        files[path] = {"rows": len(rows), "without_scores": mine.count(None)}
        print0(f"{path}: {len(rows)} rows, {mine.count(None)} without scores (left out of Fig. 2)")
    if not scored:
        raise UserError(f"--fig2_only {args.fig2_only}: no row has scores")
    os.makedirs(os.path.dirname(os.path.abspath(stem)), exist_ok=True)  # e.g. a new folder for the pooled figure
    return scored, stem, files
