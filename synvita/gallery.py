"""02_weight.py's gallery, <stem>_gallery.html: §4 Fig. 2 as a page to look at. Per misalignment type,
the V^s with the highest, middle and lowest phi (Eq. 4), each beside its V^r, with t^r and t^s (the
words t' hides marked), each member's fbar and phi; one self-contained file that opens from disk."""
import html
import io
import os

from common import hidden_word_spans
from synvita.disk import atomic_path, read_csv
from synvita.fig2 import PAPER_FIG2_MEANS
from synvita.runs import print0
from synvita.video_io import read_video

# ---- §4 Fig. 2, to look at: each V^s beside V^r, their captions, fbar and phi, in one HTML page -----
# Fig. 2 says that flip and hallucination negatives give videos that show t^r better than t^s, and
# Eq. 4 should weigh those near 0: the gallery lets a reader see it, video by video. One file, the
# frames inline (base64 JPEG thumbnails), no script and no request: it opens from disk anywhere.
GALLERY_HEIGHT = 72  # px: a frame's height on the page
# the page's only style, inline: a grid of entries per type, V^r's and V^s's frames in a row each,
# pixelated (a toy 32 px frame scaled up stays sharp), the words t' hides on a yellow mark
GALLERY_CSS = """body{font:13px sans-serif;margin:16px;color:#222;background:#fff}h2{margin:20px 0 6px}
table{border-collapse:collapse}td,th{border:1px solid #bbb;padding:1px 6px;text-align:right}
.type{display:grid;grid-template-columns:repeat(auto-fill,minmax(560px,1fr));gap:8px}
.entry{display:flex;gap:10px;border:1px solid #ccc;padding:6px}.entry p{margin:4px 0}
.frames{white-space:nowrap;margin-bottom:3px}.frames img{height:72px;margin-right:2px;image-rendering:pixelated}
.tag{display:inline-block;width:28px;font-weight:bold;vertical-align:top}.where{color:#666}
mark{background:#fde68a}.missing{display:inline-block;padding:6px;border:1px dashed #888;color:#555;max-width:300px}"""


def gallery_picks(rows, per_type):
    """The rows the gallery shows, {type: [(section, line, row)]}: per misalignment type, the `per_type`
    with the highest phi, `per_type` from the middle and the `per_type` with the lowest, each row
    once, by phi (rows without a weight are not shown: weighted_skipped.csv lists them)."""
    by_type = {}  # misalignment type -> [(line, row)], as Fig. 2 groups them
    for line, r in zip(rows.lines, rows):
        if r["weight"].strip():  # a V^s that could not be scored has no phi to show
            by_type.setdefault(r["misalignment"] or "(none)", []).append((line, r))
    picks = {}  # type -> [(section, line, row)], types in name order as fig2_table lists them
    for kind, group in sorted(by_type.items()):
        group.sort(key=lambda x: -float(x[1]["weight"]))  # phi, highest first
        # Fig. 2's claim in pictures: the highest phi should be faithful V^s, the lowest failed ones
        mid = max(0, (len(group) - per_type) // 2)  # the middle per_type, around the median phi
        sections = {"highest phi": range(per_type), "middle": range(mid, mid + per_type),
                    "lowest phi": range(len(group) - per_type, len(group))}
        shown = {}  # index -> its section: a row in two sections (a small type) is shown once
        for section, indices in sections.items():
            for i in indices:
                if 0 <= i < len(group):  # a type with fewer rows than a section asks for
                    shown.setdefault(i, section)
        picks[kind] = [(shown[i], *group[i]) for i in sorted(shown)]  # highest phi first
    return picks


def thumbnails(path, num_frames):
    """<img> tags of the num_frames frames 02 scores (uniform sampling), or a named placeholder if the
    video cannot be read: the page never breaks on a bad video."""
    import base64  # the frames go inline, as data: URLs: the page needs no file beside it
    from PIL import Image
    try:
        frames = read_video(path, num_frames)  # (T, H, W, 3) uint8, the frames the VQA members saw
    except (OSError, ValueError) as e:
        return f'<span class="missing">{html.escape(str(e))}</span>'  # the reason, in the frames' place
    tags = []
    for frame in frames:
        image = Image.fromarray(frame)  # (H, W, 3) uint8 RGB
        image.thumbnail((4 * GALLERY_HEIGHT, GALLERY_HEIGHT))  # at most 72 px high (CSS scales a toy frame up)
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=85)  # JPEG: a page of 4 x 6 x 5 types stays small
        data = base64.b64encode(buffer.getvalue()).decode()
        tags.append(f'<img src="data:image/jpeg;base64,{data}" alt="frame">')
    return "".join(tags)


def marked(caption, other):
    """The caption, HTML-escaped, its words outside LCS(t^r, t^s) marked: what t' hides (footnote 2)."""
    out, last = [], 0
    for start, end in hidden_word_spans(caption, other):
        out += [html.escape(caption[last:start]), f"<mark>{html.escape(caption[start:end])}</mark>"]
        last = end  # the text between two hidden words stays plain
    return "".join(out + [html.escape(caption[last:])])  # every caption character escaped: a caption is never markup


def gallery_entry(args, names, root, csv_name, section, line, r):
    """One V^s: V^r's and V^s's frames, t^r and t^s with their differing words marked, each member's
    fbar on both captions, fbar(V^s,t^s) - fbar(V^s,t^r), phi and the CSV line."""
    real = (thumbnails(os.path.join(args.video_root, r["videopath"]), args.num_frames) if args.video_root
            else '<span class="missing">V^r not shown: pass --video_root</span>')
    syn = thumbnails(os.path.join(root, r["syn_video"]), args.num_frames)  # syn_video: relative to the CSV
    # each member's VQAScore averaged over frames, on t^s and t^r: the two means are fbar (Eq. 4)
    cells = "".join(f"<tr><th>{html.escape(n)}</th><td>{float(r[f'vqascore_target_{n}']):.3f}</td>"
                    f"<td>{float(r[f'vqascore_real_{n}']):.3f}</td></tr>" for n in names)
    diff = float(r["score_syn_target"]) - float(r["score_syn_real"])  # fbar(V^s,t^s) - fbar(V^s,t^r): Fig. 2's x
    return (f'<div class="entry"><div><div class="frames"><span class="tag">V<sup>r</sup></span>{real}</div>'
            f'<div class="frames"><span class="tag">V<sup>s</sup></span>{syn}</div>'
            f'<p class="where">{section} · {html.escape(csv_name)}:{line}</p></div><div>'  # the row, found in the CSV
            f'<p><b>t<sup>r</sup></b> {marked(r["caption"], r["neg_caption"])}<br>'
            f'<b>t<sup>s</sup></b> {marked(r["neg_caption"], r["caption"])}</p>'  # t^s: the caption V^s was made from
            f"<table><tr><th></th><th>f&#772;(V<sup>s</sup>,t<sup>s</sup>)</th><th>f&#772;(V<sup>s</sup>,t<sup>r</sup>)"
            f"</th></tr>{cells}<tr><th>mean</th><td>{float(r['score_syn_target']):.3f}</td>"
            f"<td>{float(r['score_syn_real']):.3f}</td></tr></table>"
            # phi as 03 reads it: the weight column, by the weighting the run used (Table 4)
            f"<p>difference {diff:+.3f} · &phi; ({html.escape(args.weighting)}) = <b>{float(r['weight']):.3f}</b></p>"
            f"</div></div>")


def below_here(path):
    """A path as the page shows it: relative to the working folder when below it (no machine's
    /home/... or /tmp/... on a page that is shared), else as given (a hub id stays a hub id)."""
    return os.path.relpath(path) if os.path.isabs(path) and not os.path.relpath(path).startswith("..") else path


def write_gallery(args, out_csv, names, root, table):
    """<stem>_gallery.html: per misalignment type the V^s with the highest, middle and lowest phi
    (gallery_picks), each as gallery_entry draws it; a header with the run's settings and Fig. 2's
    per-type means (`table`: 02_weight.fig2_table) beside the paper's. Reads weighted.csv, the file it shows."""
    rows = read_csv(out_csv)  # the page shows what 03 will train on, read back from the file itself
    # the header: what made these scores, then Fig. 2's per-type means beside the paper's
    settings = {k: getattr(args, k) for k in ("generated_csv", "models", "vqascore", "weighting", "num_frames", "split")}
    settings["generated_csv"], settings["models"] = below_here(args.generated_csv), [below_here(m) for m in args.models]
    head = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>" for k, v in settings.items())  # a row a setting
    # Fig. 2's table: n and the mean of fbar(V^s,t^s) - fbar(V^s,t^r) per type, the paper's mean beside it
    fig2 = "".join(f"<tr><th>{html.escape(k)}</th><td>{s['n']}</td><td>{s['mean']:+.3f}</td>"
                   f"<td>{'' if PAPER_FIG2_MEANS.get(k) is None else f'{PAPER_FIG2_MEANS[k]:+.2f}'}</td></tr>"
                   for k, s in table.items())
    body = [f"<h1>{html.escape(below_here(out_csv))}</h1><table>{head}</table><h2>Fig. 2: f&#772;(V<sup>s</sup>,t<sup>s</sup>) - "
            f"f&#772;(V<sup>s</sup>,t<sup>r</sup>), the mean per type"
            f"</h2><table><tr><th>type</th><th>n</th><th>mean</th><th>paper</th></tr>{fig2}</table>"]
    for kind, picks in gallery_picks(rows, args.gallery_per_type).items():  # a section per misalignment type
        body.append(f'<h2>{html.escape(kind)}</h2><div class="type">')
        body += [gallery_entry(args, names, root, os.path.basename(out_csv), *p) for p in picks] + ["</div>"]
    page = (f'<!DOCTYPE html><html><head><meta charset="utf-8"><title>{html.escape(out_csv)}</title>'
            f"<style>{GALLERY_CSS}</style></head><body>{''.join(body)}</body></html>")
    path = os.path.splitext(out_csv)[0] + "_gallery.html"  # beside weighted.csv: <stem>_gallery.html
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        fh.write(page)  # atomic: a killed run leaves no half page under the final name
    print0(f"wrote {path}: open it in a browser (no server, no network)")
    return path
