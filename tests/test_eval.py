"""04_eval.py: the metrics by hand and on VideoCon's released score files, the fast scoring path
against the per-pair path, resuming, bad input, a LoRA adapter, and two torchrun ranks."""
import csv
import functools
import importlib.util
import io
import json
import os
import re
import sys
from collections import defaultdict

import numpy as np
import pytest
import torch

import common
import tiny
from test_cluster import assert_ran, torchrun_nodes
from synvita import disk, runs, shared_prefix, tasks, video_io, video_llm
from synvita import scores as score_files  # a module: the tests name their score dicts `scores`

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
spec = importlib.util.spec_from_file_location("stage04", os.path.join(ROOT, "04_eval.py"))
ev = sys.modules["stage04"] = importlib.util.module_from_spec(spec)  # registered: parse_args reads its source
spec.loader.exec_module(ev)
need = tiny.videocon_file  # VideoCon's released files, or the test is skipped saying where it looked


def prompt(caption):  # the mPLUG-Owl prompt VideoCon stores in its `caption` columns
    return common.OWL_PROMPT.format(question=common.QUESTION.format(caption=caption))


# ---- captions and score files -------------------------------------------------------------------
def test_description_unwraps_the_prompt_and_keeps_plain_captions():
    assert ev.description(prompt('a "quoted" word')) == 'a "quoted" word'
    assert ev.description("Covering [something] with [something]") == "Covering [something] with [something]"


def test_read_scores_both_layouts_duplicates_and_a_truncated_line(tmp_path):
    theirs = tmp_path / "theirs.csv"  # VideoCon: no header, the caption is the prompt, then p_yes, p_no
    with open(theirs, "w", newline="") as fh:
        csv.writer(fh).writerows([["v1", prompt("a cat"), "0.5", "0.5", "0.5"],
                                  ["v1", prompt("a cat"), "0.5", "0.5", "0.5"],
                                  ["v2", prompt("a dog"), "0.25", "0.25", "0.75"]])
    scores, _, report = score_files.read(str(theirs))
    assert scores == {("v1", "a cat"): 0.5, ("v2", "a dog"): 0.25} and report == {"duplicates": 1, "malformed": 0}
    ours = tmp_path / "ours.csv"
    ours.write_text("videopath,caption,score,logit\r\nv1,a cat,0.75,1.0986\r\nv2,a d")  # killed mid-row
    scores, rows, report = score_files.read(str(ours))
    assert scores == {("v1", "a cat"): 0.75} and report["malformed"] == 1
    assert rows == [["v1", "a cat", "0.75", "1.0986"]]
    ours.write_text("v1,a cat,0.75\nv1,a cat,0.5\n")
    with pytest.raises(common.UserError, match=r"ours.csv: lines 1 and 2 score \('v1', 'a cat'\) as 0.75 and 0.5"):
        score_files.read(str(ours))
    # issue 26: a BOM and no header: the first key is v1, not \ufeffv1; a score that is no f in [0, 1] is named
    ours.write_bytes("v1,a cat,0.75\r\nv2,a dog,1.5\r\n".encode("utf-8-sig"))
    scores, _, report = score_files.read(str(ours))
    assert scores == {("v1", "a cat"): 0.75} and report["malformed"] == 1


# ---- metrics by hand ----------------------------------------------------------------------------
def test_ranking_metrics_by_hand():
    m = ev.ranking_metrics([1, 0, 1, 0])  # positives at ranks 1 and 3: AP = (1/1 + 2/3) / 2
    assert m["AP"] == pytest.approx(5 / 6) and (m["R@1"], m["R@5"], m["R@10"]) == (1, 1, 1)
    m = ev.ranking_metrics([0] * 6 + [1] + [0] * 5)  # one positive at rank 7
    assert m["AP"] == pytest.approx(1 / 7) and (m["R@1"], m["R@5"], m["R@10"]) == (0, 0, 1)


def retrieval_rows(match):
    return [{"videopath": v, "caption": prompt(q), "match": str(m)}
            for q, videos in match.items() for v, m in videos.items()]


def test_retrieval_ties_by_hand():
    # query q: b scores highest; the positive and a negative tie at 0.5; the second positive is last
    rows = retrieval_rows({"q": {"a": 1, "b": 0, "c": 0, "d": 1}})
    scores = {("a", "q"): 0.5, ("b", "q"): 0.9, ("c", "q"): 0.5, ("d", "q"): 0.1}
    out = ev.retrieval(rows, scores, candidates=4, ties="stable")  # tie in videopath order: b, a, c, d
    assert out["mAP"] == pytest.approx(100 * (1 / 2 + 2 / 4) / 2) and out["R@1"] == 0 and out["R@5"] == 100
    assert out["tie_sensitive_queries"] == 1
    rows = retrieval_rows({"q": {"z": 1, "b": 0, "c": 0, "d": 1}})  # the tied positive now sorts after c
    scores = {("z", "q"): 0.5, ("b", "q"): 0.9, ("c", "q"): 0.5, ("d", "q"): 0.1}
    out = ev.retrieval(rows, scores, candidates=4, ties="stable")  # b, c, z, d
    assert out["mAP"] == pytest.approx(100 * (1 / 3 + 2 / 4) / 2)
    # a tie between two positives only cannot change AP: both tie rules agree, and nothing is tie-sensitive
    scores[("d", "q")] = 0.5
    scores[("c", "q")] = 0.1
    for ties in ("videocon", "stable"):
        out = ev.retrieval(rows, scores, candidates=4, ties=ties)
        assert out["mAP"] == pytest.approx(100 * (1 / 2 + 2 / 3) / 2) and out["tie_sensitive_queries"] == 0


def test_retrieval_drops_and_names_incomplete_queries():
    rows = retrieval_rows({"full": {"a": 1, "b": 0}, "short": {"a": 0, "b": 1}, "no positive": {"a": 0, "b": 0}})
    scores = {("a", "full"): 0.2, ("b", "full"): 0.1, ("a", "short"): 0.3,
              ("a", "no positive"): 1, ("b", "no positive"): 0}
    out = ev.retrieval(rows, scores, candidates=2)
    assert (out["queries"], out["queries_dropped"], out["mAP"]) == (1, 2, 100.0)
    assert out["dropped"] == {"short": "1 scored candidates, 0 positive",
                              "no positive": "2 scored candidates, 0 positive"}


def test_bad_task_input_is_named_or_counted(tmp_path):
    task = str(tmp_path / "t.csv")
    rows = [{"videopath": "a", "caption": prompt("q"), "match": 1}, {"videopath": "b", "caption": "q", "match": 0}]
    disk.write_csv(task, rows + rows[:1])  # an exact duplicate row: dropped and counted
    rows_read, report, pairs = tasks.read("ssv2_events", task)
    assert report["rows_skipped"] == {"exact duplicate of an earlier row": 1} and len(rows_read) == 2
    assert pairs == {("a", "q"): 2, ("b", "q"): 6}  # each pair and the line of its first row (a prompt: 4 lines)
    disk.write_csv(task, rows + [{**rows[1], "match": 1}])  # b is both a match and a non-match for q
    with pytest.raises(common.UserError, match=r"t.csv: lines 6 and 7 conflict: \('b', 'q'\) is 0 on one, 1 on"):
        tasks.read("ssv2_events", task)  # before any scoring, not after it
    with pytest.raises(common.UserError, match="--scores is the scores of one task; 2 task files were given"):
        ev.main(ev.Args(ssv2_events=task, atphard=task, scores=task, out_dir=str(tmp_path)))


def test_degenerate_and_broken_task_files_are_named(tmp_path, capsys):
    """Issue 14 items 7, 10, 13, 14: empty captions, a row that is its own negative, rows with a
    wrong field count are named by line and skipped; all-match retrieval and header-only files stop."""
    task = tmp_path / "t.csv"
    task.write_text('videopath,caption,neg_caption\nv1,"a dog\nruns",a cat\nv2,,a cat\nv3,a cat,a cat\n'
                    "v4,a cat,a dog,extra\nv5,a bird\nv6,a fish,a frog\n")
    rows, report, pairs = tasks.read("videocon_llm", str(task))
    assert [r["videopath"] for r in rows] == ["v1", "v6"] and ("v2", "a cat") not in pairs
    printed = capsys.readouterr().out
    assert f"{task}: 1 row(s) skipped, empty caption: line(s) 4" in printed  # line 2-3 is one quoted row
    assert f"{task}: 1 row(s) skipped, neg_caption equal to caption: line(s) 5" in printed
    assert f"{task}: 2 row(s) skipped, not 3 fields as in the header: line(s) 6, 7" in printed
    task.write_text("videopath,caption,match\na,q,1\nb,q,1\n")
    with pytest.raises(ValueError, match="t.csv: every row has match = 1"):
        tasks.read("ssv2_events", str(task))
    task.write_text("videopath,caption,match\n")
    with pytest.raises(ValueError, match=r"t.csv: no usable row \(only a header\)"):
        tasks.read("ssv2_events", str(task))
    task.write_bytes("videopath,caption,match\na,caf\u00e9,1\nb,th\xe9,0\n".encode("latin-1"))
    with pytest.raises(ValueError, match="t.csv:2: byte 0xe9 is not UTF-8"):
        tasks.read("ssv2_events", str(task))


def test_entailment_auc_against_sklearn_and_by_hand():
    from sklearn.metrics import roc_auc_score
    rows = [{"videopath": "v1", "caption": "p1", "neg_caption": "n1", "hard": True},  # as read_task reads them
            {"videopath": "v2", "caption": prompt("p2"), "neg_caption": "n2", "hard": False}]
    scores = {("v1", "p1"): 0.9, ("v1", "n1"): 0.4, ("v2", "p2"): 0.4, ("v2", "n2"): 0.1}
    # positive-negative pairs: .9>.4, .9>.1, .4=.4 (counts 1/2), .4>.1 -> 3.5 / 4
    assert ev.entailment_auc(rows, scores)["auc"] == pytest.approx(87.5)
    assert ev.entailment_auc(rows, scores)["auc"] == pytest.approx(100 * roc_auc_score([1, 0, 1, 0], [.9, .4, .4, .1]))
    args = ev.Args()
    human = ev.task_metrics("videocon_human", rows, {**scores, ("v1", "n1"): 0.95}, args)
    assert human["auc_hard"] == 0.0 and human["items_hard"] == 2 and human["auc"] == pytest.approx(50.0)
    del scores[("v2", "n2")]
    assert ev.entailment_auc(rows, scores)["items_without_score"] == 1


def test_atp_accuracy_by_hand():
    def question(video, q, answer, f):
        return [{"videopath": video, "question": q, "answer": str(answer), "option": str(k), "caption": f"{q} {k}"}
                for k in range(5)], {(video, f"{q} {k}"): x for k, x in enumerate(f)}
    rows, scores = [], {}
    for video, q, answer, f in [("/x/1.mp4", "why", 2, [.1, .2, .9, .3, .4]),  # right
                                ("/x/2.mp4", "when", 0, [.5, .5, .1, .1, .1]),  # tie: the first wins, right
                                ("/x/3.mp4", "how", 1, [.5, .5, .1, .1, .1]),  # tie: the first wins, wrong
                                ("/x/4.mp4", "why", 0, [.1, .1, .1, .1, .1])]:  # gets a 6th statement below
        r, s = question(video, q, answer, f)
        rows += r
        scores.update(s)
    rows.append({**rows[-1], "option": "5", "caption": "extra"})
    scores[("/x/4.mp4", "extra")] = 1.0
    types = {("1", "why"): "CW", ("2", "when"): "TN", ("3", "how"): "CH"}
    out = ev.atp_accuracy(rows, scores, types)
    assert (out["questions"], out["questions_dropped"]) == (3, 1) and "/x/4.mp4 | why" in out["dropped"]
    assert out["accuracy"] == pytest.approx(200 / 3) and out["accuracy_C"] == 50.0 and out["accuracy_T"] == 100.0


# ---- VideoCon's released score files give VideoCon's numbers ------------------------------------
def videocon_calc_ssv2(task, scores_path, vid_per_caption):
    """VideoCon's src/calc_ssv2.py (Hritikbansal/videocon), its pandas merge/sort/groupby done by hand:
    per caption, candidates sorted by videopath, ranks = np.argsort(-pred) (default kind)."""
    match = {(r["videopath"], r["caption"]): int(r["match"]) for r in disk.read_csv(task)}
    groups = defaultdict(list)
    for row in csv.reader(open(scores_path, newline="")):
        if (row[0], row[1]) in match:
            groups[row[1]].append((row[0], float(row[2]), match[(row[0], row[1])]))
    mAP, r1, r5, r10 = [], [], [], []
    for caption, cands in groups.items():
        if len(cands) != vid_per_caption:
            continue
        cands.sort()
        pred, labels = np.array([c[1] for c in cands]), [c[2] for c in cands]
        ranks = np.argsort(-pred)
        hits, hit_precision = 0, []
        for i in range(len(ranks)):
            if labels[ranks[i]] == 1:
                hits += 1
                hit_precision.append(hits / (i + 1))
        mAP.append(sum(hit_precision) / len(hit_precision))
        top = [labels[k] for k in ranks[:10]]
        for hits_k, k in ((r1, 1), (r5, 5), (r10, 10)):
            hits_k.append(int(1 in top[:k]))
    return {k: 100 * sum(v) / len(v) for k, v in (("mAP", mAP), ("R@1", r1), ("R@5", r5), ("R@10", r10))}


def test_ssv2_temporal_released_scores_give_videocons_numbers(tmp_path):
    task, scores = need("eval_ssv2_temporal.csv"), need("eval_ssv2_temporal_scores.csv")
    res = ev.main(ev.Args(ssv2_temporal=task, scores=scores, out_dir=str(tmp_path)))["ssv2_temporal"]
    assert (res["queries"], res["queries_dropped"], res["pairs_scored"], res["candidates"]) == (18, 0, 3888, 216)
    reference = videocon_calc_ssv2(task, scores, 216)  # same numpy on the same machine -> same tie order
    for k, v in reference.items():
        assert res[k] == pytest.approx(v, abs=1e-9), k
    # the platform-independent tie rule, hard-coded (every one of the 18 queries has label-mixing ties)
    res = ev.main(ev.Args(ssv2_temporal=task, scores=scores, out_dir=str(tmp_path), ties="stable"))["ssv2_temporal"]
    assert res["mAP"] == pytest.approx(15.50059837044923, abs=1e-9) and res["tie_sensitive_queries"] == 18
    assert (res["R@1"], res["R@5"], res["R@10"]) == pytest.approx((100 * 4 / 18, 100 * 9 / 18, 100 * 11 / 18))


def test_atphard_released_scores_give_videocons_numbers(tmp_path):
    task, scores = need("eval-nextqa-atphard.csv"), need("atphard_scores.csv")
    need("nextqa-atphard.csv")
    res = ev.main(ev.Args(atphard=task, scores=scores, out_dir=str(tmp_path)))["atphard"]
    # VideoCon's src/eval_atphard.py on these files: 1844 questions (one video+question pair holds two
    # NExT-QA questions, 10 statements, and is dropped), 757 right: 443 of 1012 causal, 314 of 832 temporal
    assert (res["questions"], res["questions_dropped"], res["score_file_rows"]["duplicates"]) == (1844, 1, 8)
    assert res["accuracy"] == pytest.approx(100 * 757 / 1844) and res["accuracy"] == pytest.approx(41.052060737527114)
    assert res["accuracy_C"] == pytest.approx(100 * 443 / 1012) and res["accuracy_T"] == pytest.approx(100 * 314 / 832)


def test_final_test_example_scores(tmp_path):
    scores = need("final_test_scores.csv")
    rows = [(r[0], ev.description(r[1])) for r in csv.reader(open(scores, newline=""))]
    task = tmp_path / "final_test_pair.csv"  # test.csv's two captions as one contract row
    disk.write_csv(str(task), [{"videopath": rows[0][0], "caption": rows[0][1], "neg_caption": rows[1][1]}])
    res = ev.main(ev.Args(videocon_llm=str(task), scores=scores, out_dir=str(tmp_path)))["videocon_llm"]
    assert (res["auc"], res["items"]) == (100.0, 2)  # f = 0.90625 for the soccer caption, 0.0849609375 for basketball


# ---- 04's scoring path on a tiny model ----------------------------------------------------------
CAPTIONS = ["a red square moves to the right", "a dog", "the square moves left and then it stops quickly",
            "Covering [something] with [something]"]


@pytest.mark.parametrize("batch_size", [3, 64])  # batches that split a video's captions, and one batch
@torch.no_grad()
def test_fast_path_equals_the_per_pair_path(video_llava_dir, batch_size):
    model, processor = video_llm.load_video_llm(video_llava_dir)
    videos = [tiny.moving_square(seed=0), tiny.moving_square(direction=-1, color=(0, 0, 255), seed=1)]
    index = [1, 0, 0, 1, 1, 0, 0]
    captions = [CAPTIONS[k % 4] for k in range(len(index))]
    fast = tiny.alignment_logits(model, processor, videos, captions, index, per_row=batch_size)  # as score_task
    slow = torch.cat([tiny.alignment_logits(model, processor, [videos[v]], [c]) for v, c in zip(index, captions)])
    np.testing.assert_allclose(fast.numpy(), slow.numpy(), atol=1e-5)
    assert fast.std() > 1e-3  # the pairs really differ


def write_toy_task(tmp_path, with_missing=True):
    """Two captions x three real mp4 videos (plus a missing one) in the SSv2 layout."""
    root = tmp_path / "videos"
    for k in range(3):
        video_io.write_video(str(root / f"{k}.mp4"), tiny.moving_square(num_frames=8, direction=1 - 2 * (k % 2), seed=k))
    videos = [f"{k}.mp4" for k in range(3)] + (["gone.mp4"] if with_missing else [])
    rows = [{"videopath": v, "caption": prompt(c), "match": int(k == j)}
            for j, c in enumerate(CAPTIONS[:2]) for k, v in enumerate(videos)]
    disk.write_csv(str(tmp_path / "events.csv"), rows)
    return str(tmp_path / "events.csv"), str(root)


def scores_of(path):
    return score_files.read(path)[0]


def test_main_scores_resumes_and_reports_bad_videos(video_llava_dir, tmp_path, capsys):
    task, root = write_toy_task(tmp_path)
    args = ev.Args(model=video_llava_dir, ssv2_events=task, candidates=3, video_root=root,
                   out_dir=str(tmp_path / "out"), batch_size=3, video_batch=2)
    res = ev.main(args)["ssv2_events"]
    assert (res["videos_failed"], res["pairs"], res["pairs_scored"]) == (1, 8, 6) and "gone.mp4" in res["failed"][0]
    assert (res["queries"], res["queries_dropped"]) == (2, 0)  # the missing video is not a scored candidate
    assert "unreadable video" in capsys.readouterr().out
    final = str(tmp_path / "out" / "ssv2_events_scores.csv")
    first = scores_of(final)
    model, processor = video_llm.load_video_llm(video_llava_dir)  # spot-check one pair the long way
    frames = video_io.read_video(os.path.join(root, "1.mp4"))
    a = tiny.alignment_logits(model, processor, [frames], [CAPTIONS[0]])
    assert first[("1.mp4", CAPTIONS[0])] == pytest.approx(torch.sigmoid(a).item(), abs=1e-5)
    # summary and skip file agree: gone.mp4 is one unreadable video, named with its task line
    skipped = list(csv.DictReader(open(tmp_path / "out" / "ssv2_events_skipped.csv", newline="")))
    assert res["skipped"] == len(skipped) == 1 and skipped[0]["videopath"] == "gone.mp4"
    assert skipped[0]["line"] == "14" and "unreadable video" in skipped[0]["reason"]
    # resume: drop two scored rows, leave a torn record behind as a killed run would (a record
    # without its line end); they are rescored, the torn one is not counted done
    lines = open(final, newline="").read().split("\r\n")
    open(final, "w", newline="").write("\r\n".join(lines[:-3]) + "\r\n")
    torn = '["' + '", "'.join(lines[-3].split(",")[:2]) + '", "0.1", "1.5"]'
    open(str(tmp_path / "out" / "ssv2_events_scores.rank0.jsonl"), "w", newline="").write(torn)
    capsys.readouterr()
    res = ev.main(args)["ssv2_events"]
    assert "4 of 8 pairs already scored; 2 videos to run" in capsys.readouterr().out  # 2.mp4 again, gone.mp4
    assert scores_of(final) == pytest.approx(first, abs=1e-6) and res["pairs_scored"] == 6
    assert sorted(os.listdir(tmp_path / "out")) == ["results.json", "ssv2_events_scores.csv", "ssv2_events_settings.json",
                                                    "ssv2_events_skipped.csv"]
    # settings-checked resume: scores of 8 frames are not reused for 4 frames (nor another task file)
    with pytest.raises(ValueError, match=r"ssv2_events_settings.json: the work here was made with other settings "
                                         r"\(num_frames: 8 then, 4 now\)"):
        ev.main(ev.Args(**{**vars(args), "num_frames": 4}))


# ---- VideoCon-Human from VideoCon's own videocon_human.csv (issue 25 item 9): video_url, no videopath --
HUMAN_URL = "https://storage.googleapis.com/videocon-human/activitynet/{}.mp4"
HUMAN = [("v_abc", True), ("v_def", False), ("v_ghi", True), ("v_gone", True)]  # (clip, hard); v_gone: no file


def write_human_task(tmp_path):
    """A few rows in videocon_human.csv's layout (video_url, caption, neg_caption, nle, hard), the clips
    copied locally under their URLs' file names, but for v_gone; one URL carries a query string."""
    root = tmp_path / "activitynet"
    rows = []
    for k, (clip, hard) in enumerate(HUMAN):
        if clip != "v_gone":
            video_io.write_video(str(root / f"{clip}.mp4"), tiny.moving_square(num_frames=8, direction=1 - 2 * (k % 2),
                                                                              seed=k))
        url = HUMAN_URL.format(clip) + ("?X-Goog-Signature=ab%2Fc&X-Goog-Expires=600" if clip == "v_def" else "")
        rows.append({"video_url": url, "caption": CAPTIONS[k % 2], "neg_caption": CAPTIONS[2 + k % 2],
                     "nle": "the video shows something else", "hard": str(hard)})  # pandas writes True / False
    disk.write_csv(str(tmp_path / "videocon_human.csv"), rows)
    return str(tmp_path / "videocon_human.csv"), str(root)


def test_videocon_human_as_released_reads_each_url_as_a_local_file_with_scores(tmp_path, capsys):
    task, _ = write_human_task(tmp_path)
    scores = tmp_path / "scores.csv"  # f(V, t) by the clips' file names; v_gone.mp4 has none
    f = {"v_abc": (0.9, 0.3), "v_def": (0.4, 0.6), "v_ghi": (0.7, 0.8)}  # (caption, neg_caption)
    disk.write_csv(str(scores), [{"videopath": f"{clip}.mp4", "caption": CAPTIONS[k % 2 + 2 * j], "score": f[clip][j]}
                                   for k, (clip, _) in enumerate(HUMAN[:3]) for j in (0, 1)])
    res = ev.main(ev.Args(videocon_human=task, scores=str(scores), out_dir=str(tmp_path / "out")))["videocon_human"]
    # positives .9 .4 .7 against negatives .3 .6 .8: 3 + 1 + 2 of 9 pairs; hard (v_abc, v_ghi): .9 > .3 .8, .7 > .3
    assert res["auc"] == pytest.approx(100 * 6 / 9) and res["auc_hard"] == pytest.approx(75.0)
    assert (res["items"], res["items_without_score"], res["items_hard"], res["pairs"]) == (6, 2, 4, 8)
    assert res["videopath"] == "the file name of video_url"
    assert f"{task}: no videopath column: each video_url is read as <--video_root>/<its file name>, " \
           f"e.g. {HUMAN_URL.format('v_abc')} -> v_abc.mp4" in capsys.readouterr().out


def test_videocon_human_as_released_scored_by_a_model_counts_a_missing_clip(video_llava_dir, tmp_path):
    from sklearn.metrics import roc_auc_score
    task, root = write_human_task(tmp_path)
    res = ev.main(ev.Args(model=video_llava_dir, videocon_human=task, video_root=root,
                          out_dir=str(tmp_path / "out")))["videocon_human"]
    # v_gone.mp4 is missing: an unreadable video, as in any other layout; its two items have no score
    assert (res["videos_failed"], res["pairs"], res["pairs_scored"]) == (1, 8, 6)
    assert os.path.join(root, "v_gone.mp4") in res["failed"][0]
    assert (res["items"], res["items_without_score"], res["items_hard"]) == (6, 2, 4)
    got = scores_of(str(tmp_path / "out" / "videocon_human_scores.csv"))
    assert {v for v, _ in got} == {"v_abc.mp4", "v_def.mp4", "v_ghi.mp4"}  # the query string is not in the name
    pos = [(f"{clip}.mp4", CAPTIONS[k % 2], CAPTIONS[2 + k % 2], hard) for k, (clip, hard) in enumerate(HUMAN[:3])]
    auc = roc_auc_score([1] * 3 + [0] * 3, [got[(v, c)] for v, c, _, _ in pos] + [got[(v, n)] for v, _, n, _ in pos])
    hard = [p for p in pos if p[3]]
    auc_hard = roc_auc_score([1, 1, 0, 0], [got[(v, c)] for v, c, _, _ in hard] + [got[(v, n)] for v, _, n, _ in hard])
    assert res["auc"] == pytest.approx(100 * auc) and res["auc_hard"] == pytest.approx(100 * auc_hard)


def test_other_layouts_keep_videopath(tmp_path, capsys):
    task, _ = write_human_task(tmp_path)
    rows = disk.read_csv(task)
    both = str(tmp_path / "both.csv")  # a videopath column wins: read as before
    disk.write_csv(both, [{"videopath": f"local/{k}.mp4", **r} for k, r in enumerate(rows)])
    assert [r["videopath"] for r in tasks.read("videocon_human", both)[0]] == [f"local/{k}.mp4" for k in range(4)]
    assert "no videopath column" not in capsys.readouterr().out
    with pytest.raises(ValueError, match=r"missing column\(s\) \['videopath'\]"):  # only Human reads video_url
        tasks.read("videocon_llm", task)
    disk.write_csv(task, rows + [{**rows[1], "video_url": "https://elsewhere.org/x/v_abc.mp4"}])
    with pytest.raises(ValueError, match=r"lines 2 and 6: two video_urls with the file name 'v_abc.mp4'"):
        tasks.read("videocon_human", task)


def test_lora_adapter_loads_and_changes_scores(video_llava_dir, tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model
    model, processor = video_llm.load_video_llm(video_llava_dir)
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    torch.manual_seed(0)
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:  # lora_B starts at zero (a no-op adapter); make it do something
            p.data.normal_(0, 0.5)
    peft_model.save_pretrained(str(tmp_path / "adapter"))
    task, root = write_toy_task(tmp_path, with_missing=False)
    common_args = dict(model=video_llava_dir, ssv2_events=task, candidates=3, video_root=root)
    base = ev.main(ev.Args(**common_args, out_dir=str(tmp_path / "base")))
    tuned = ev.main(ev.Args(**common_args, adapter=str(tmp_path / "adapter"), out_dir=str(tmp_path / "tuned")))
    s_base = scores_of(str(tmp_path / "base" / "ssv2_events_scores.csv"))
    s_tuned = scores_of(str(tmp_path / "tuned" / "ssv2_events_scores.csv"))
    assert s_base.keys() == s_tuned.keys() and max(abs(s_base[k] - s_tuned[k]) for k in s_base) > 1e-3
    assert base["ssv2_events"]["pairs_scored"] == tuned["ssv2_events"]["pairs_scored"] == 6
    # the fast path runs through the LoRA layers exactly as the per-pair path does
    loaded = PeftModel.from_pretrained(video_llm.load_video_llm(video_llava_dir)[0], str(tmp_path / "adapter")).eval()
    frames = video_io.read_video(os.path.join(root, "2.mp4"))
    with torch.no_grad():
        a = tiny.alignment_logits(loaded, processor, [frames], [CAPTIONS[1]])
    assert s_tuned[("2.mp4", CAPTIONS[1])] == pytest.approx(torch.sigmoid(a).item(), abs=1e-5)
    # issue 14 item 6: an adapter whose LoRA weights sit where this base has none (another base model's
    # layout, here its layer 0 renamed to a layer 7 that the tiny model lacks) stops instead of scoring
    from safetensors.torch import load_file, save_file
    import shutil
    shutil.copytree(tmp_path / "adapter", tmp_path / "other")
    weights = load_file(str(tmp_path / "other" / "adapter_model.safetensors"))
    save_file({k.replace("layers.0.", "layers.7."): v for k, v in weights.items()},
              str(tmp_path / "other" / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match=r"--adapter .*other: \d+ LoRA tensor\(s\) do not fit the base model"):
        ev.main(ev.Args(**common_args, adapter=str(tmp_path / "other"), out_dir=str(tmp_path / "other_out")))


def test_two_torchrun_nodes_give_the_one_rank_scores(video_llava_dir, tmp_path):
    """Issue 36: two torchrun "nodes" (README's local two-node command): the one process's scores and results."""
    task, root = write_toy_task(tmp_path)
    flags = ["--model", video_llava_dir, "--ssv2_events", task, "--candidates", "3", "--video_root", root]
    ev.main(runs.parse_args(ev.Args, flags + ["--out_dir", str(tmp_path / "one")]))
    printed = assert_ran(torchrun_nodes(os.path.join(ROOT, "04_eval.py"), *flags, "--out_dir", tmp_path / "two"))
    one = scores_of(str(tmp_path / "one" / "ssv2_events_scores.csv"))
    two = scores_of(str(tmp_path / "two" / "ssv2_events_scores.csv"))
    assert len(one) == 6 and one == pytest.approx(two, abs=1e-6)
    assert "unreadable video" in printed and "gone.mp4" in printed  # rank 1's failure reaches rank 0
    one, two = (json.load(open(tmp_path / d / "results.json"))["results"]["ssv2_events"] for d in ("one", "two"))
    for results, run in ((one, "one"), (two, "two")):  # the file named is in the run's folder, as its "args"
        assert results.pop("score_file") == str(tmp_path / run / "ssv2_events_scores.csv")
    assert one == two  # the same metrics and counts


def test_ranks_end_through_files_not_collectives(video_llava_dir, tmp_path, monkeypatch):
    """Issue 14 item 18: two simulated ranks with no process group at all, rank 1 long done before
    rank 0 starts: no barrier or gather to time out; rank 0 merges both parts and rank 1's failures."""
    task, root = write_toy_task(tmp_path)
    args = ev.Args(model=video_llava_dir, ssv2_events=task, candidates=3, video_root=root, out_dir=str(tmp_path / "out"))
    _, _, pairs = tasks.read("ssv2_events", task)
    model, processor = video_llm.load_video_llm(video_llava_dir)
    for rank in (1, 0):
        monkeypatch.setenv("RANK", str(rank))
        final, bad = ev.score_task("ssv2_events", pairs, model, processor, args, runs.Dist(rank, rank, 2, "cpu", rank == 0))
    assert len(scores_of(final)) == 6 and len(bad) == 1 and "gone.mp4" in bad[0]  # gone.mp4 is rank 1's
    assert sorted(os.listdir(tmp_path / "out")) == ["ssv2_events_scores.csv", "ssv2_events_settings.json"]


# ---- issue 26: bad input, round 2 ---------------------------------------------------------------
@pytest.mark.parametrize("value,read", [(" 1 ", 1), ("1", 1), ("1.0", 1), ("+0", 0), ("0.", 0)] +
                         [(v, None) for v in ("inf", "nan", "1e400", "1.5", "True", "", "2", "-1", "1_0", "0x1")])
def test_match_cells_that_mean_the_same_are_read_the_same(tmp_path, value, read):
    task = tmp_path / "t.csv"
    task.write_text(f"videopath,caption,match\na,q,0\n b ,q,{value}\nc,q,1\n")
    if read is None:  # refused on reading, before any scoring, naming file:line and column
        with pytest.raises(common.UserError, match=rf"t.csv:3: column match: {re.escape(repr(value))} is not 0 or 1"):
            tasks.read("ssv2_events", str(task))
        return
    rows, _, pairs = tasks.read("ssv2_events", str(task))
    assert rows[1]["match"] == read and ("b", "q") in pairs  # the id stripped, the cell an integer


def test_atphard_cells_types_and_conflicts(tmp_path):
    task, types = tmp_path / "atp.csv", tmp_path / "types.csv"
    rows = [{"videopath": " /x/1.mp4", "question": "why ", "answer": " 2", "option": f"{k}.0", "caption": f"s{k}"}
            for k in range(5)]
    disk.write_csv(str(task), rows)
    types.write_text("video,question,type\n1 , why,cw\n")  # an id and a question with spaces, a type in lower case
    args = ev.Args(atphard=str(task), atphard_types=str(types))
    read, _, pairs = tasks.read("atphard", str(task))
    scores = {p: 0.9 if p[1] == "s2" else 0.1 for p in pairs}
    out = ev.task_metrics("atphard", read, scores, args, tasks.question_types(args))
    assert (out["accuracy"], out["accuracy_C"], out["questions_without_type"]) == (100.0, 100.0, 0)
    disk.write_csv(str(task), rows[:4] + [{**rows[4], "answer": "3"}])  # one question, two correct answers
    with pytest.raises(common.UserError, match=r"atp.csv: lines 2 and 6 conflict: /x/1.mp4, question 'why': "
                                               r"answer 2 and answer 3"):
        tasks.read("atphard", str(task))
    disk.write_csv(str(task), rows[:4] + [{**rows[4], "option": "1"}])  # option 1 twice
    with pytest.raises(common.UserError, match=r"atp.csv: lines 3 and 6 conflict: .*: option 1 twice"):
        tasks.read("atphard", str(task))
    disk.write_csv(str(task), rows[:4] + [{**rows[4], "option": "5"}])
    with pytest.raises(common.UserError, match=r"atp.csv:6: column option: '5' is not an integer from 0 to 4"):
        tasks.read("atphard", str(task))


def test_entailment_duplicates_counted_conflicts_refused_split_and_hard_read_as_meant(tmp_path, capsys):
    task = tmp_path / "llm.csv"
    disk.write_csv(str(task), [{"videopath": v, "caption": c, "neg_caption": n, "split": split} for v, c, n, split in
                                 [("v1", "a dog", "a cat", " Test"), ("v1", prompt("a dog"), "a cat", "test"),
                                  ("v2", "a dog", "a cat", "train"), ("v3", "a fox", "a cow", "TEST")]])
    rows, report, pairs = tasks.read("videocon_llm", str(task))
    assert [r["videopath"] for r in rows] == ["v1", "v3"] and report["rows_in_split_test"] == 2
    assert report["rows_skipped"] == {"of another split than test": 1, "the same item as an earlier row": 1}
    printed = capsys.readouterr().out
    assert "1 row(s) skipped, the same item as an earlier row: line(s) 3" in printed  # the prompt is the same caption
    assert "1 row(s) skipped, of another split than test: line(s) 7" in printed  # the prompt spans lines 3-6
    task.write_text("videopath,caption,neg_caption\nv1,a dog,a cat\nv1,a cat,a cow\n")  # a cat: match 0 and 1
    with pytest.raises(common.UserError, match=r"llm.csv: lines 2 and 3 conflict: \('v1', 'a cat'\) is neg_caption"):
        tasks.read("videocon_llm", str(task))
    task.write_text("videopath,caption,neg_caption,hard\nv1,a dog,a cat, TRUE \nv2,a dog,a cat,0\nv3,a dog,a cat,Yes\n"
                    "v4,a dog,a cat,maybe\n")
    with pytest.raises(common.UserError, match=r"llm.csv:5: column hard: 'maybe' is not True or False"):
        tasks.read("videocon_human", str(task))


def fake_yes_no_logits(model, processor, videos, captions, index, prompt="", per_row=0):
    """A stand-in for f's logits (no model): logit_Yes from the caption's length and the video."""
    return torch.tensor([[len(c) / 7 - 2 * i, 0.0] for c, i in zip(captions, index)], dtype=torch.float32)


def test_resume_after_a_cut_at_every_byte_of_the_last_records(tmp_path, monkeypatch):
    """Issue 26: a part file cut anywhere (after a CRLF inside a caption, inside a UTF-8 character,
    before the line end of a record that parses) resumes to the scores and AUC of an uninterrupted run."""
    monkeypatch.setattr(shared_prefix, "yes_no_logits", fake_yes_no_logits)
    root = tmp_path / "videos"
    for k in range(3):
        video_io.write_video(str(root / f"{k}.mp4"), tiny.moving_square(num_frames=8, seed=k))
    task = str(tmp_path / "llm.csv")
    disk.write_csv(task, [{"videopath": "0.mp4", "caption": "a dog\r\nruns", "neg_caption": "a cat"},
                            {"videopath": "1.mp4", "caption": "un café", "neg_caption": "a dog\r\nruns"},
                            {"videopath": "2.mp4", "caption": "a fox", "neg_caption": "deux cafés\r\n"}])
    rows, _, pairs = tasks.read("videocon_llm", task)
    dist = runs.Dist()

    def run(out):  # score_task's merged scores and the entailment AUC over them
        args = ev.Args(videocon_llm=task, video_root=str(root), out_dir=str(out), video_batch=1)
        scores = score_files.read(ev.score_task("videocon_llm", pairs, None, None, args, dist)[0])[0]
        return scores, ev.entailment_auc(rows, scores)["auc"]
    whole = run(tmp_path / "whole")
    merge = score_files.merge_parts  # the part file as a run leaves it just before the merge
    monkeypatch.setattr(score_files, "merge_parts", lambda *a: (None, []))
    ev.score_task("videocon_llm", pairs, None, None, ev.Args(videocon_llm=task, video_root=str(root),
                                                             out_dir=str(tmp_path / "cut"), video_batch=1), dist)
    monkeypatch.setattr(score_files, "merge_parts", merge)
    part = tmp_path / "cut" / "videocon_llm_scores.rank0.jsonl"
    data = part.read_bytes()
    assert data.count(b"\n") == 6 and b"caf\\u00e9" in data  # one record a line
    last_two = data.rstrip(b"\n").rfind(b"\n", 0, data.rstrip(b"\n").rfind(b"\n")) + 1
    for cut in range(last_two, len(data) + 1):  # every byte offset of the last two records
        part.write_bytes(data[:cut])
        if os.path.exists(final := tmp_path / "cut" / "videocon_llm_scores.csv"):
            os.remove(final)
        assert run(tmp_path / "cut") == whole, cut


def write_long_task(tmp_path, captions):
    root = tmp_path / "videos"
    for k in range(2):
        video_io.write_video(str(root / f"{k}.mp4"), tiny.moving_square(num_frames=8, seed=k))
    disk.write_csv(str(tmp_path / "events.csv"), [{"videopath": f"{k}.mp4", "caption": c, "match": int(j == k)}
                                                    for j, c in enumerate(captions) for k in range(2)])
    return str(tmp_path / "events.csv"), str(root)


def test_a_prompt_past_the_models_positions_is_left_out_named_and_counted(video_llava_dir, tmp_path, capsys):
    long = " ".join(["square"] * 1500)  # the tiny model has 1,024 positions
    task, root = write_long_task(tmp_path, [CAPTIONS[0], long])
    res = ev.main(ev.Args(model=video_llava_dir, ssv2_events=task, candidates=2, video_root=root,
                          out_dir=str(tmp_path / "out")))["ssv2_events"]
    assert (res["pairs"], res["pairs_scored"], res["pairs_too_long"], res["skipped"]) == (4, 2, 2, 2)
    assert f"{task}: 2 pair(s) left out, their prompt runs past the model's 1024 positions: line(s) 4, 5" \
        in capsys.readouterr().out
    skipped = list(csv.DictReader(open(tmp_path / "out" / "ssv2_events_skipped.csv", newline="")))
    assert [(s["line"], s["videopath"]) for s in skipped] == [("4", "0.mp4"), ("5", "1.mp4")]
    assert "past the model's 1024" in skipped[0]["reason"]
    task, root = write_long_task(tmp_path / "all", [long, long + " again"])  # a task left with no pair
    with pytest.raises(common.UserError, match="ssv2_events: no pair of .* was scored: every prompt runs past"):
        ev.main(ev.Args(model=video_llava_dir, ssv2_events=task, candidates=2, video_root=root,
                        out_dir=str(tmp_path / "all" / "out")))


def test_a_wrong_video_root_stops_naming_the_task_and_an_example(video_llava_dir, tmp_path, capsys):
    task, _ = write_toy_task(tmp_path)
    done = tiny.run_main("04_eval.py", "--model", video_llava_dir, "--ssv2_events", task, "--video_root",
                         tmp_path / "wrong", "--out_dir", tmp_path / "out")
    tiny.assert_user_error(done, "ssv2_events: no pair of", "4 of 4 videos could not be read",
                           os.path.join(str(tmp_path / "wrong"), "0.mp4"), "check --video_root")
    # a score file whose keys match nothing of the task: the same one line, not "pairs_scored 0"
    scores = tmp_path / "scores.csv"
    scores.write_text("other/0.mp4,q,0.5\n")
    with pytest.raises(common.UserError, match=r"ssv2_events: no pair of .*events.csv was scored: .*scores.csv has no "
                                               r"score for any of its pairs"):
        ev.main(ev.Args(ssv2_events=task, scores=str(scores), out_dir=str(tmp_path / "out2")))
    assert f"{scores}: 1 score(s) match no pair of {task}, e.g. ('other/0.mp4', 'q')" in capsys.readouterr().out


def test_help_shows_the_atphard_types_default_once(capsys):
    with pytest.raises(SystemExit):
        runs.parse_args(ev.Args, ["--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps the help text
    assert text.count("(default: nextqa-atphard.csv beside --atphard)") == 1 and "(default: )" not in text


# ---- issue 37: a kill anywhere, a full disk at the part file, captions that quote the prompt, --out_dir --
def toy_run(video_llava_dir, tmp_path, *more):
    """04 on the toy SSv2 task as a user runs it (in-process): the CompletedProcess, and the bytes of every
    file it left in <tmp_path>/out."""
    task, root = str(tmp_path / "events.csv"), str(tmp_path / "videos")
    if not os.path.exists(task):  # made once a test
        write_toy_task(tmp_path)
    out = tmp_path / "out"
    done = tiny.run_main("04_eval.py", "--model", video_llava_dir, "--ssv2_events", task, "--candidates", 3,
                         "--video_root", root, "--out_dir", out, "--video_batch", 1, *more)
    return done, {f: (out / f).read_bytes() for f in sorted(os.listdir(out))} if out.exists() else {}


def clean_run(video_llava_dir, tmp_path, *more):
    """The files of an uninterrupted run in <tmp_path>/out, which is then removed for the run under test."""
    import shutil
    done, clean = toy_run(video_llava_dir, tmp_path, *more)
    assert done.returncode == 0, done.stderr[-3000:]
    shutil.rmtree(tmp_path / "out")
    return clean


@pytest.mark.parametrize("point", ["after the merged file", "after the finished marker"])
def test_a_kill_at_the_merge_and_a_rerun_give_the_uninterrupted_bytes(video_llava_dir, tmp_path, monkeypatch, point):
    """Issue 37 case 1: killed after <task>_scores.csv was written but before the parts were removed,
    the rerun merged the parts a second time (6 duplicate rows, results.json `duplicates: 6`)."""
    from synvita import parts
    clean = clean_run(video_llava_dir, tmp_path)
    module, function = (disk, "write_csv") if point == "after the merged file" else (parts, "finish")
    real = getattr(module, function)

    def then_killed(path, *a, **k):  # the step is done, then Ctrl-C (KeyboardInterrupt) before the next
        real(path, *a, **k)
        if path.endswith(("_scores.csv", "_finished.rank0.json")):
            raise KeyboardInterrupt
    monkeypatch.setattr(module, function, then_killed)
    done, left = toy_run(video_llava_dir, tmp_path)
    assert done.returncode == 130 and "ssv2_events_scores.rank0.jsonl" in left, (done.returncode, sorted(left))
    assert ("ssv2_events_scores.csv" in left) == (point == "after the merged file")
    monkeypatch.setattr(module, function, real)
    done, rerun = toy_run(video_llava_dir, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert rerun == clean and b'"duplicates": 0' in rerun["results.json"]


@pytest.mark.parametrize("where", ["empty", "torn"])  # nothing written yet, or half of the first record
def test_a_full_disk_at_the_part_file_is_one_line_and_the_rerun_gives_the_clean_bytes(video_llava_dir, tmp_path,
                                                                                      monkeypatch, where):
    """Issue 37 case 2: ENOSPC where score_task writes its part file: one line naming the part file; the empty or
    torn part file and the settings file it leaves refuse neither the same command once the disk is freed (the
    clean run's bytes) nor a corrected one with other settings (no score was kept under the old ones)."""
    import errno
    import shutil
    clean = clean_run(video_llava_dir, tmp_path)
    real = score_files.write_records

    def full_disk(fh, records):
        real(text := io.StringIO(), records)  # the records' true bytes, of which the first half record fits
        first = text.getvalue().split("\n")[0]
        fh.write(first[:len(first) // 2] if where == "torn" else "")  # what reached the disk before it was full
        fh.flush()
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    for more in ([], ["--num_frames", 4]):  # the same command, then a corrected one
        shutil.rmtree(tmp_path / "out", ignore_errors=True)
        monkeypatch.setattr(score_files, "write_records", full_disk)
        done, left = toy_run(video_llava_dir, tmp_path)
        part = tmp_path / "out" / "ssv2_events_scores.rank0.jsonl"
        assert done.stderr.strip().splitlines()[-1] == f"error: {part}: cannot write it: No space left on device"
        tiny.assert_user_error(done)
        assert sorted(left) == ["ssv2_events_scores.rank0.jsonl", "ssv2_events_settings.json"]
        monkeypatch.setattr(score_files, "write_records", real)
        done, rerun = toy_run(video_llava_dir, tmp_path, *more)
        assert done.returncode == 0, done.stderr[-3000:]
        if not more:
            assert rerun == clean
        else:  # its own settings replace those of the run that scored nothing
            assert json.loads(rerun["ssv2_events_settings.json"])["num_frames"] == 4
            assert rerun == clean_run(video_llava_dir, tmp_path, *more)


def test_a_caption_that_quotes_the_prompts_question_is_kept_whole(tmp_path):
    """Issue 37 case 3: only a cell that IS VideoCon's mPLUG-Owl prompt is unwrapped to its description."""
    quoting = ['the sign asks description: "open"?', 'He said description: "hi"? and left',
               prompt("a dog") + " and more", "Human: Does this video entail the description: \"a cat\"?"]
    for caption in quoting:
        assert ev.description(caption) == caption
    assert ev.description(prompt('a "quoted" word').replace("\n", "\r\n").rstrip()) == 'a "quoted" word'
    task = str(tmp_path / "t.csv")
    disk.write_csv(task, [{"videopath": "a", "caption": quoting[0], "match": 1},
                          {"videopath": "b", "caption": prompt("open"), "match": 0}])
    assert list(tasks.read("ssv2_events", task)[2]) == [("a", quoting[0]), ("b", "open")]  # two captions, not one


def test_out_dir_is_checked_against_every_input_before_any_work(tmp_path):
    """Issue 37 case 4: --out_dir through a file, or an output of 04 that is one of its inputs however named,
    stops before the model is loaded (--model names no folder here) and before anything is written."""
    task, root = write_toy_task(tmp_path)
    run = functools.partial(tiny.run_main, "04_eval.py", "--model", tmp_path / "no-model", "--ssv2_events", task,
                            "--video_root", root)
    tiny.assert_user_error(run("--out_dir", task), f"--out_dir {task}: {task} is a file, not a folder")
    tiny.assert_user_error(run("--out_dir", os.path.join(task, "out")), f"{task} is a file, not a folder")
    tiny.assert_user_error(run("--out_dir", os.path.join(root, ".")), "--out_dir", "is --video_root")
    out = tmp_path / "out"
    out.mkdir()
    (out / "ssv2_events_skipped.csv").write_text("videopath,caption,score\n0.mp4,q,0.5\n")
    done = tiny.run_main("04_eval.py", "--ssv2_events", task, "--scores", out / "ssv2_events_skipped.csv",
                         "--out_dir", out)  # 04 would rewrite (or remove) the very file it reads
    tiny.assert_user_error(done, "--out_dir (ssv2_events_skipped.csv)", "is --scores")
    assert sorted(os.listdir(out)) == ["ssv2_events_skipped.csv"]
