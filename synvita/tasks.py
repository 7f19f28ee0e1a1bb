"""§6's datasets: VideoCon's released task files, each layout read and every cell checked before any
scoring (a bad cell found after hours of scoring costs those hours). read() gives a task's rows, a
report for results.json and the (V, t) pairs that f scores; the rows it leaves out are named and
counted, and an item with two labels stops the run. VideoCon-Human as released names its clips by
URL (videopaths_from_urls); ATP-Hard's question types are in NExT-QA's own file (question_types).
"""
import csv
import os
import re
from collections import defaultdict

import common
from synvita import disk, runs
from synvita.runs import UserError

# ---- the task flags and their files ---------------------------------------------------------------
# VideoCon's `caption` columns may hold mPLUG-Owl's whole prompt (common.OWL_PROMPT around
# common.QUESTION): the description t is what fills its {caption}. Only a cell that IS that prompt, as
# a whole, is unwrapped: a caption that merely quotes `description: "..."?` is a caption (issue 37).
HEAD, TAIL = common.OWL_PROMPT.format(question=common.QUESTION).split("{caption}")
# its line ends as \n or \r\n (a CSV saved on Windows keeps \r\n inside quoted cells); any spaces after "AI:"
PROMPT = re.compile(r"\r?\n".join(map(re.escape, HEAD.split("\n"))) + "(.*)"
                    + r"\r?\n".join(map(re.escape, TAIL.rstrip().split("\n"))) + r"\s*", re.S)


def description(caption):
    """The description t inside a cell that is mPLUG-Owl's whole prompt; any other caption as it is."""
    return match.group(1) if (match := PROMPT.fullmatch(caption)) else caption


def files_given(args, names):
    """{task: its file} of the task flags given (`names`, in their order): none given, or a --scores file
    with more than one task, is a mistake named before any model is loaded."""
    files = {name: getattr(args, name) for name in names if getattr(args, name)}  # "": not asked for
    if not files:  # nothing to evaluate
        raise UserError(f"give a task file ({', '.join('--' + t for t in names)})")
    if args.scores and len(files) != 1:  # one score file cannot be two tasks' scores
        raise UserError(f"--scores is the scores of one task; {len(files)} task files were given")
    return files


def read(name, path):
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
        raise UserError(f"{path}: no row left to evaluate")
    if name.startswith("ssv2") and len({r["match"] for r in rows}) < 2:  # AP needs both labels
        raise UserError(f"{path}: every row has match = {rows[0]['match']}; retrieval needs both labels")
    pairs = {}  # each (V, t) once, with the line of the first row that holds it
    for line, r in zip(rows.lines, rows):
        for t in texts:  # f(V, t) is scored once per pair, whichever rows share it
            pairs.setdefault((r["videopath"], description(r[t])), line)
    return rows, report, dict(sorted(pairs.items()))


# ---- every cell checked, one label per item, VideoCon-Human's URLs --------------------------------
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
                raise UserError(f"{path}:{line}: column {column}: {value!r} is not {allowed}")
            r[column] = int(value.split(".")[0])  # int() takes the spaces and a sign, not the ".0"
        if "hard" in r:  # Table 3's Human-Hard column: a misread flag moves a row in or out silently
            if (flag := FLAGS.get(r["hard"].strip().lower())) is None:
                raise UserError(f"{path}:{line}: column hard: {r['hard']!r} is not True or False")
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
                raise UserError(f"{path}: lines {old_line} and {line} conflict: {item} is {old} on one, "
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
            raise UserError(f"{path}: lines {old} and {line} conflict: {video}, question {question!r}: {problem}")


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
            raise UserError(f"{path}:{line}: video_url {url!r} has no file name")
        if (other := first.setdefault(r["videopath"], (line, url)))[1] != url:
            raise UserError(f"{path}: lines {other[0]} and {line}: two video_urls with the file name "
                            f"{r['videopath']!r} ({other[1]}, {url})")
    # one line, so that a reader knows where the clips are looked for
    runs.print0(f"{path}: no videopath column: each video_url is read as <--video_root>/<its file name>, "
                f"e.g. {rows[0]['video_url'].strip()} -> {rows[0]['videopath']}")


# ---- ATP-Hard's question types, SSv2's labels as the metrics take them ----------------------------
def question_types(args):
    """ATP-Hard's question types, {(video id, question): type}: they are in NExT-QA's own file, not in
    the statements file. Read before any scoring; ids and questions stripped, the type's case ignored
    (its first letter is the split: C causal, T temporal)."""
    path = types_file(args)
    rows = disk.read_csv(path, ["video", "question", "type"], texts=("video", "question", "type"))
    return {(r["video"].strip(), r["question"].strip()): r["type"].strip().upper() for r in rows}


def types_file(args):
    """The NExT-QA file of ATP-Hard's question types: --atphard_types, or nextqa-atphard.csv beside --atphard."""
    return args.atphard_types or os.path.join(os.path.dirname(args.atphard), "nextqa-atphard.csv")


def match_groups(rows):
    """SSv2 retrieval's labels: {query description: {videopath: match}}. One video is a match of a query
    or not, never both: two labels would make AP ambiguous (read() refuses such a file before any
    scoring; this guards rows given directly, as a test or the toy world gives them)."""
    groups = defaultdict(dict)  # query caption -> {videopath: match}
    for r in rows:  # the first label of a (V, t) is kept; another one is refused
        if groups[description(r["caption"])].setdefault(r["videopath"], int(r["match"])) != int(r["match"]):
            raise UserError(f"{r['videopath']}, {description(r['caption'])!r}: listed as a match and as a "
                            f"non-match")
    return groups
