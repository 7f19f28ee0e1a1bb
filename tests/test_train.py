"""03_train.py: the objective's wiring, the data plan, and toy-size training runs through main(args),
including a two-process torchrun run and a kill-and-resume, on the tiny random models."""
import importlib.util
import json
import math
import os
import subprocess
import sys
import types

import numpy as np
import pytest
import torch

import common
import tiny
import tiny_train
from test_cluster import assert_ran, torchrun_nodes
import synvita.pairs  # as synvita.pairs and synvita.triplets: the tests' own `pairs` and `triplets` are lists
import synvita.triplets
from synvita import checkpoints, disk, released_loss, runs, training, video_io, video_llm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
spec = importlib.util.spec_from_file_location("train", os.path.join(ROOT, "03_train.py"))
train = importlib.util.module_from_spec(spec)
spec.loader.exec_module(train)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The tiny models are far faster on one thread than on cores shared with other work."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """8 rows (4 colours x 2 directions): (csv, video_root)."""
    return tiny_train.write_toy_set(str(tmp_path_factory.mktemp("toy")))


def make_args(model, csv, video_root, out_dir, **kw):
    """CPU-sized settings: 8 triplets = 16 rows, global batch 8 rows = 2 micro-batches of 4 (2 triplets),
    2 epochs = 4 steps."""
    base = dict(model=model, train_csv=csv, video_root=video_root, out_dir=str(out_dir), batch_size=8,
                micro_batch_size=4, num_epochs=2, lr=1e-2, warmup_steps=1, num_workers=0, save_every=2)
    return train.Args(**{**base, **kw})


def read_log(out_dir):
    return [json.loads(line) for line in open(os.path.join(out_dir, "log.jsonl"), encoding="utf-8")]


def lora_weights(out_dir):
    from safetensors.torch import load_file
    return load_file(os.path.join(out_dir, "adapter", "adapter_model.safetensors"))


def assert_same_weights(a, b, atol):
    assert a.keys() == b.keys() and len(a) > 0
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=0, msg=k)


def feedback(toy):
    return os.path.join(os.path.dirname(toy[1]), "feedback.csv")  # tiny_train writes it beside videos/


@pytest.fixture(scope="module")
def reference(video_llava_dir, toy, tmp_path_factory):
    """One uninterrupted 1-process run with the 8 explanation rows mixed in (16 + 8 rows: 3 steps an
    epoch, 6 steps; LoRA dropout on): (out_dir, returned model)."""
    out = tmp_path_factory.mktemp("reference")
    return out, train.main(make_args(video_llava_dir, *toy, out, feedback_csv=feedback(toy)))


# ---- the data plan and the weights --------------------------------------------------------------
def test_packing_keeps_triplets_whole_and_visits_every_item_once():
    sizes = [2] * 7 + [1] * 5  # 7 triplets (2 rows each) and 5 explanations: 19 rows
    for m in (2, 4, 6):
        for seed in range(5):
            order = torch.randperm(len(sizes), generator=torch.Generator().manual_seed(seed)).tolist()
            batches = training.pack(order, sizes, m)
            rows = [sum(sizes[i] for i in b) for b in batches]
            assert all(r == m for r in rows), (m, rows)  # issue 37: every micro-batch full, none a row short
            seen = sum(batches, [])
            assert len(seen) == len(set(seen))  # nothing twice
            dropped = set(order) - set(seen)
            assert sum(sizes[i] for i in dropped) < m + 1  # a tail that cannot fill one, and the odd explanation
            assert sum(rows) == 19 - sum(sizes[i] for i in dropped)
    assert training.pack([0, 1, 2], [2, 2, 2], 4) == [[0, 1]]  # the odd triplet is the dropped tail


def test_global_batches_do_not_depend_on_the_number_of_processes():
    items = [dict(rows=2)] * 6 + [dict(rows=1)] * 4  # 16 rows
    args = train.Args(batch_size=8, micro_batch_size=2, seed=3)
    plan = [training.epoch_micro_batches(items, e, args) for e in range(3)]
    assert all(len(e) == 8 for e in plan)
    for step in range(6):  # 3 epochs of 2 steps
        one = training.micro_batches(plan, step, 4, runs.Dist())
        two = [training.micro_batches(plan, step, 2, runs.Dist(rank=r, world_size=2)) for r in (0, 1)]
        assert one == two[0] + two[1]  # the same micro-batches, rank 0 takes the first half
    epoch = sum((sum(training.micro_batches(plan, s, 4, runs.Dist()), []) for s in (2, 3)), [])
    assert sorted(epoch) == list(range(10))  # an epoch visits every item once
    assert epoch != sum((sum(training.micro_batches(plan, s, 4, runs.Dist()), []) for s in (0, 1)), [])
    with pytest.raises(IndexError):
        training.micro_batches(plan, 6, 4, runs.Dist())


def test_explanations_are_read_like_videocon_prepares_them(toy, tmp_path):
    rows = disk.read_csv(feedback(toy))
    rows[1]["split"] = "test"  # another split: not read
    rows[2]["nle"] = " "  # an empty explanation: the reader's bad row, named and counted
    rows[3]["videopath"] = "gone.mp4"
    disk.write_csv(tmp_path / "fb.csv", rows)
    kept, skipped = synvita.triplets.load_explanations(train.Args(feedback_csv=str(tmp_path / "fb.csv"), video_root=toy[1]))
    assert [e["line"] for e in kept] == [2, 6, 7, 8, 9] and all(e["rows"] == 1 and e["kind"] == "nle" for e in kept)
    assert kept[0]["neg"] == rows[0]["neg_caption"] and kept[0]["nle"] == rows[0]["nle"]
    assert [(s["line"], s["reason"]) for s in skipped] == [(4, "empty nle"),  # the reader's skip, listed too
                                                           (5, "video not found: " + os.path.join(toy[1], "gone.mp4"))]
    assert synvita.triplets.load_explanations(train.Args(feedback_csv="")) == ([], [])


def test_no_row_of_another_split_reaches_a_batch(toy, tmp_path, capsys):
    """VideoCon's val and test rows never train (issue 25): 03 keeps the --split rows of both CSVs
    (case and spaces aside), counts the others in one line each, and no micro-batch of the plan
    holds anything else."""
    splits = ["train", "val", "test", " Train", "train", "test", "TRAIN ", "train"]
    for name, source, order in (("w.csv", toy[0], splits), ("fb.csv", feedback(toy), splits[::-1])):
        rows = disk.read_csv(source)
        for r, split in zip(rows, order):
            r["split"] = split
        disk.write_csv(tmp_path / name, rows)
    args = train.Args(train_csv=str(tmp_path / "w.csv"), feedback_csv=str(tmp_path / "fb.csv"), video_root=toy[1],
                      batch_size=4, micro_batch_size=2, num_epochs=3)
    items = synvita.triplets.load_triplets(args)[0] + synvita.triplets.load_explanations(args)[0]
    printed = capsys.readouterr().out
    for name in ("w.csv", "fb.csv"):
        assert f"{tmp_path / name}: 3 row(s) of other splits left out (--split 'train'" in printed
    allowed = {("triplet", 2 + i) for i, s in enumerate(splits) if s.strip().lower() == "train"}
    allowed |= {("nle", 2 + i) for i, s in enumerate(splits[::-1]) if s.strip().lower() == "train"}
    assert {(it["kind"], it["line"]) for it in items} == allowed
    plan, _, _ = training.micro_batch_plan(items, args, runs.Dist())
    batched = {(items[i]["kind"], items[i]["line"]) for epoch in plan for micro_batch in epoch for i in micro_batch}
    assert batched and batched <= allowed


@pytest.mark.parametrize("weighting", sorted(train.WEIGHTINGS) + ["csv"])
def test_weights_from_the_csv_or_recomputed(toy, weighting):
    rows, skipped = synvita.triplets.load_triplets(train.Args(train_csv=toy[0], video_root=toy[1], weighting=weighting))
    fr = np.array([0.1 * (k % 5) for k in range(8)])  # tiny_train: fbar(Vs,ts) = 0.8, fbar(Vs,tr) = fr
    expected = {"fixed": np.ones(8), "target": np.full(8, 0.8), "target_x_inv_real": 0.8 * (1 - fr),
                "indicator": np.ones(8), "difference": 0.8 - fr, "csv": 0.8 - fr}.get(weighting)
    if expected is None:  # a student's new weighting: whatever it says, clamped at 0
        expected = np.maximum(train.WEIGHTINGS[weighting](np.full(8, 0.8), fr), 0)
    np.testing.assert_allclose([r["w"] for r in rows], expected, atol=1e-9)
    assert skipped == [] and rows[0]["syn"] == os.path.join(os.path.dirname(toy[0]), "videos", "syn_0.mp4")


def test_rows_without_a_twin_train_on_l_real_and_bad_rows_are_a_counted_skip(toy):
    rows = disk.read_csv(toy[0])
    rows[1]["weight"] = ""  # missing weight: no usable twin
    rows[2]["score_syn_real"] = ""  # an unread cell: the weight is there
    rows[3]["videopath"] = "nowhere.mp4"  # no real video: skipped
    rows[4]["syn_video"] = "videos/nowhere.mp4"  # the twin's file is missing
    rows[5]["weight"] = "0"  # phi = 0: the twin is used, its terms are 0
    rows[6]["syn_video"] = ""  # 01_generate.py did not render it
    csv = os.path.join(os.path.dirname(toy[0]), "bad.csv")  # syn_video is relative to the CSV's folder
    disk.write_csv(csv, rows)
    kept, skipped = synvita.triplets.load_triplets(train.Args(train_csv=csv, video_root=toy[1]))
    assert [r["line"] for r in kept] == [2, 3, 4, 6, 7, 8, 9]  # the file's lines: the header is line 1
    assert [r["line"] for r in kept if r["syn"] is None] == [3, 6, 8]
    assert all(r["w"] == 0.0 for r in kept if r["syn"] is None) and kept[4]["w"] == 0.0 and kept[4]["syn"]
    no_twin = "trained without a twin: "
    assert [(s["line"], s["reason"]) for s in skipped] == [
        (3, no_twin + "weight is missing"),
        (5, "video not found: " + os.path.join(toy[1], "nowhere.mp4")),
        (6, no_twin + "synthetic video not found: " + os.path.join(os.path.dirname(toy[0]), "videos", "nowhere.mp4")),
        (8, no_twin + "no syn_video")]
    for r in rows:
        r["videopath"] = "nowhere.mp4"
    disk.write_csv(csv, rows)
    with pytest.raises(ValueError, match="bad.csv: no row can be trained on"):
        synvita.triplets.load_triplets(train.Args(train_csv=csv, video_root=toy[1]))
    with pytest.raises(ValueError, match="--weighting 'nope'"):
        synvita.triplets.load_triplets(train.Args(train_csv=csv, video_root=toy[1], weighting="nope"))
    # the VideoCon baseline needs no synthetic columns at all
    rows = disk.read_csv(toy[0])
    disk.write_csv(csv, [{k: r[k] for k in ("videopath", "caption", "neg_caption")} for r in rows])
    kept, skipped = synvita.triplets.load_triplets(train.Args(train_csv=csv, video_root=toy[1], use_syn=False))
    assert len(kept) == 8 and skipped == [] and all(r["syn"] is None for r in kept)


def test_bad_training_rows_are_named_by_line(toy, tmp_path, capsys):
    """Issue 14 items 7, 8, 9, 12, 13, 14: empty captions, exact duplicates and rows with a wrong field
    count are named by line and skipped; weights above 1 or VQAScores outside [0, 1], bytes that are
    not UTF-8 and header-only files stop the run, naming file and line."""
    rows = disk.read_csv(toy[0])
    csv = os.path.join(os.path.dirname(toy[0]), "bad.csv")
    disk.write_csv(csv, rows + [rows[0], {**rows[1], "caption": " "}])  # lines 10 and 11
    kept, skipped = synvita.triplets.load_triplets(train.Args(train_csv=csv, video_root=toy[1]))
    assert len(kept) == 8 and sum(r["caption"] == rows[0]["caption"] for r in kept) == 1
    printed = capsys.readouterr().out
    assert f"{csv}: 1 row(s) skipped, exact duplicate of an earlier row: line(s) 10" in printed
    assert f"{csv}: 1 row(s) skipped, empty caption: line(s) 11" in printed
    # issue 26: the reader's skipped rows are listed for skipped.csv too, each once
    assert [(s["file"], s["line"], s["reason"]) for s in skipped] == [
        (csv, 10, "exact duplicate of an earlier row"), (csv, 11, "empty caption")]
    # the same triplet again with another weight (or twin) is no conflict (MSR-VTT repeats captions
    # of a clip): both rows train, as in the released code, each with its own twin and phi
    disk.write_csv(csv, rows + [{**rows[0], "weight": "0.5", "syn_video": rows[1]["syn_video"]}])
    kept, skipped = synvita.triplets.load_triplets(train.Args(train_csv=csv, video_root=toy[1]))
    again = [t for t in kept if (t["caption"], t["neg"]) == (rows[0]["caption"], rows[0]["neg_caption"])]
    assert len(kept) == 9 and skipped == [] and [t["line"] for t in again] == [2, 10]
    assert [t["w"] for t in again] == [float(rows[0]["weight"]), 0.5]
    disk.write_csv(csv, rows[:2] + [{**rows[2], "weight": "7.5"}, {**rows[3], "weight": "2"}])
    with pytest.raises(common.UserError, match=r"bad.csv:4: weight 7.5 outside \[0, 1\] \(and 1 more row"):
        synvita.triplets.load_triplets(train.Args(train_csv=csv, video_root=toy[1]))
    disk.write_csv(csv, rows[:2] + [{**rows[2], "weight": "0,5"}])  # a decimal comma is no missing score
    with pytest.raises(common.UserError, match=r"bad.csv:4: weight '0,5' is not a number$"):
        synvita.triplets.load_triplets(train.Args(train_csv=csv, video_root=toy[1]))
    disk.write_csv(csv, rows[:2] + [{**rows[2], "score_syn_real": "-0.5"}])
    with pytest.raises(common.UserError, match=r"bad.csv:4: score_syn_real -0.5 outside \[0, 1\]$"):
        synvita.triplets.load_triplets(train.Args(train_csv=csv, video_root=toy[1], weighting="difference"))
    disk.write_csv(csv, rows[:2])
    with open(csv, "ab") as fh:
        fh.write(",".join(rows[2].values()).replace("square", "carr\xe9").encode("latin-1") + b"\r\n")
    with pytest.raises(ValueError, match=r"bad.csv:4: byte 0xe9 is not UTF-8"):
        synvita.triplets.load_triplets(train.Args(train_csv=csv, video_root=toy[1]))
    disk.write_csv(csv, [], fieldnames=list(rows[0]))
    with pytest.raises(ValueError, match=r"bad.csv: no usable row \(only a header\)"):
        synvita.triplets.load_triplets(train.Args(train_csv=csv, video_root=toy[1]))


@pytest.mark.parametrize("weight", ["-0.5", "-inf", "nan"])
def test_a_weight_outside_0_1_or_nan_stops_the_run(toy, tmp_path, weight):
    """Issue 37 case 2: a weight below 0 (-0.5, -inf) was clamped to 0 and trained, and "nan" trained
    as a missing one; every phi of 02 lies in [0, 1], so each stops the run before any work, naming
    file:line, as 2 and +inf did. An EMPTY weight (02 could not weigh V^s) still trains the real
    triplet alone (test_rows_without_a_twin_...)."""
    rows = disk.read_csv(toy[0])
    csv = os.path.join(os.path.dirname(toy[0]), f"weight_{weight}.csv")
    disk.write_csv(csv, rows[:3] + [{**rows[3], "weight": weight}] + rows[4:])  # line 5
    done = tiny.run_main("03_train.py", "--model", tmp_path / "no-model", "--train_csv", csv, "--video_root", toy[1],
                         "--out_dir", tmp_path / "out")
    tiny.assert_user_error(done, f"{csv}:5: weight ", "'nan' is not a number" if weight == "nan" else
                           f"weight {weight} outside [0, 1]")
    assert not os.path.exists(tmp_path / "out")
    disk.write_csv(csv, rows[:3] + [{**rows[3], "score_syn_real": weight}] + rows[4:])  # the VQAScores alike
    with pytest.raises(common.UserError, match=f"weight_{weight}.csv:5: score_syn_real "):
        synvita.triplets.load_triplets(train.Args(train_csv=csv, video_root=toy[1], weighting="difference"))


def test_one_twin_with_two_weights_is_refused_naming_both_lines(toy, tmp_path):
    """Issue 37 case 4: the same triplet with the same syn_video on two rows with different weights
    trained twice, silently, each with its phi. One V^s has one phi: the run stops before any work,
    naming both lines (an empty weight against a number too). The same twin with the same phi (a
    row differing elsewhere) trains on each row, as a repeated caption does."""
    rows = disk.read_csv(toy[0])  # line 4 (rows[2]): phi 0.6
    csv = os.path.join(os.path.dirname(toy[0]), "two_weights.csv")
    disk.write_csv(csv, rows + [{**rows[2], "weight": "0.1"}])  # line 10
    done = tiny.run_main("03_train.py", "--model", tmp_path / "no-model", "--train_csv", csv, "--video_root", toy[1],
                         "--out_dir", tmp_path / "out")
    tiny.assert_user_error(done, f"{csv}:10: the triplet and syn_video of line 4 with another weight (0.1 here, "
                                 "0.6 there): one V^s has one phi")
    assert not os.path.exists(tmp_path / "out")
    disk.write_csv(csv, rows + [{**rows[2], "weight": ""}])
    with pytest.raises(common.UserError, match=r"two_weights.csv:10: .* line 4 with another weight \(empty here, 0.6"):
        synvita.triplets.load_triplets(train.Args(train_csv=csv, video_root=toy[1]))
    disk.write_csv(csv, rows + [{**rows[2], "misalignment": "object"}])  # the same twin, the same phi
    kept, skipped = synvita.triplets.load_triplets(train.Args(train_csv=csv, video_root=toy[1]))
    assert [t["line"] for t in kept if t["caption"] == rows[2]["caption"]] == [4, 10] and skipped == []


# ---- every pair of a micro-batch in one call, and Eq. (7) -----------------------------------------
def plain_logits(model, processor, video, question, caption, answer=()):
    """Logits of one whole prompt (+ teacher-forced answer ids) in an ordinary forward pass: the last
    1 + len(answer) positions, which predict the answer's tokens and the end token."""
    text, _ = common.entailment_prompt(processor, "video_llava", caption, "llava_v1", question)
    enc = processor(text=text, videos=[video], return_tensors="pt")
    enc["input_ids"] = torch.cat([enc["input_ids"], torch.tensor([list(answer)], dtype=torch.long)], 1)
    enc["attention_mask"] = torch.ones_like(enc["input_ids"])
    return model(**enc).logits[0, -1 - len(answer):].float()


@torch.no_grad()
def test_one_call_equals_each_pair_scored_alone(video_llava_dir, toy):
    model, processor = video_llm.load_video_llm(video_llava_dir)
    args = train.Args(train_csv=toy[0], video_root=toy[1], feedback_csv=feedback(toy), answer_loss="vocab")
    triplets, _ = synvita.triplets.load_triplets(args)
    triplets[1]["syn"], triplets[1]["w"] = None, 0.0  # a triplet without its twin
    batch, paths, frames = training.load_videos(triplets[:2] + synvita.triplets.load_explanations(args)[0][:1], args)
    assert len(paths) == len(frames) == 3  # 2 real videos + 1 synthetic, each decoded once
    pairs = train.micro_batch_pairs(model, processor, batch, paths, frames, args)
    assert [(k, name) for k, name, *_ in pairs] == [(0, "rr"), (0, "rs"), (0, "ss"), (0, "sr"), (0, "r'"), (0, "s'"),
                                                    (1, "rr"), (1, "rs"), (2, "nle")]
    tok, q = processor.tokenizer, common.QUESTION
    yes, no = common.answer_token_ids(tok, common.entailment_prompt(processor, "video_llava", "", "llava_v1")[0])
    for k, name, a, tokens in pairs:
        r = batch[k]
        video = frames[paths.index(r["syn"] if name[0] == "s" else r["real"])]
        if name == "nle":  # the explanation's tokens and the end token, each from the whole text run alone
            asked = common.entailment_prompt(processor, "video_llava", r["neg"], "llava_v1", synvita.pairs.NLE_QUESTION)[0]
            answer = common.answer_ids(tok, asked, r["nle"])
            assert tok.decode(answer).strip() == r["nle"]
            alone = plain_logits(model, processor, video, synvita.pairs.NLE_QUESTION, r["neg"], answer)
            torch.testing.assert_close(tokens[0].float(), alone, atol=1e-4, rtol=0)
            assert tokens[1].tolist() == answer + [tok.eos_token_id]
            continue
        caption = r["caption"] if name in ("rr", "sr", "r'") else r["neg"]
        hidden = common.hidden_word_spans(caption, r["neg"] if name == "r'" else r["caption"]) if "'" in name else None
        one = tiny.alignment_logits(model, processor, [video], [caption], hidden=[hidden])
        assert a.item() == pytest.approx(one.item(), abs=1e-5), (name, k)
        if "'" in name:
            assert tokens is None
            continue
        word = yes if name in ("rr", "ss") else no  # the released loss: the word, then the end token
        alone = plain_logits(model, processor, video, q, caption, [word])
        torch.testing.assert_close(tokens[0].float(), alone, atol=1e-4, rtol=0)
        assert tokens[1].tolist() == [word, tok.eos_token_id]
    assert common.hidden_word_spans(batch[0]["caption"], batch[0]["neg"])  # t' really hides a word
    assert abs(pairs[0][2] - pairs[4][2]) > 1e-4


def logit(f):
    return math.log(f / (1 - f))  # f = sigmoid(a)


def by_hand_pairs(tokens=None):
    """One triplet (w = 0.5) with every pair, one without a twin, and one explanation (two tokens)."""
    f = dict(rr=0.9, rs=0.4, ss=0.6, sr=0.3, **{"r'": 0.5, "s'": 0.5})
    pairs = [(0, k, torch.tensor(logit(v)), (tokens or {}).get(k)) for k, v in f.items()]
    pairs += [(1, "rr", torch.tensor(logit(0.8)), (tokens or {}).get("rr")), (1, "rs", torch.tensor(logit(0.2)), (tokens or {}).get("rs"))]
    pairs += [(2, "nle", torch.tensor(0.0), (torch.log(torch.tensor([[0.5, 0.25, 0.25], [0.1, 0.8, 0.1]])), torch.tensor([0, 1])))]
    batch = [dict(kind="triplet", w=0.5, syn="x.mp4"), dict(kind="triplet", w=0.0, syn=None), dict(kind="nle")]
    return pairs, batch


def test_objective_by_hand_two_way():
    pairs, batch = by_hand_pairs()
    terms = train.objective(pairs, batch, train.Args(lambda_scr=2.0, gamma=0.2))
    l_real = -(math.log(0.9) + math.log(0.6) + math.log(0.8) + math.log(0.8)) / 2  # mean over the 2 triplets
    l_syn = -0.5 * (math.log(0.6) + math.log(0.7)) / 2  # the twin-less triplet: w = 0, in the mean
    # V^s: relu(.2+.5-.6)=.1 + relu(.2+.3-.5)=0 ; V^r: relu(.2+.5-.9)=0 + relu(.2+.4-.5)=.1 ; times w, / 2
    l_scr = 0.5 * 0.2 / 2
    l_nle = -(math.log(0.5) + math.log(0.8)) / 2  # the explanation's mean token cross-entropy
    for name, value in dict(l_real=l_real, l_syn=l_syn, l_scr=l_scr, l_nle=l_nle).items():
        assert terms[name].item() == pytest.approx(value, abs=1e-6), name
    assert terms["loss"].item() == pytest.approx(l_real + l_syn + 2.0 * l_scr + l_nle, abs=1e-6)
    real_only = train.objective(pairs[6:8], batch[1:2], train.Args(use_syn=False))
    assert real_only["l_syn"].item() == real_only["l_scr"].item() == real_only["l_nle"].item() == 0.0


def test_objective_by_hand_vocab():
    """The released loss: full-vocabulary CE over [word, end] of every entailment pair and over the
    explanation's tokens, phi on synthetic pairs, one sum / N answer tokens; L_scr over half-triplets."""
    def p(*probs):  # log-probabilities over a 3-word vocabulary: 0 Yes, 1 No, 2 end
        return torch.log(torch.tensor(probs))
    yes, no = [0, 2], [1, 2]
    tokens = dict(rr=(p([0.7, 0.1, 0.2], [0.1, 0.1, 0.8]), torch.tensor(yes)),
                  rs=(p([0.2, 0.6, 0.2], [0.1, 0.1, 0.8]), torch.tensor(no)),
                  ss=(p([0.5, 0.3, 0.2], [0.2, 0.2, 0.6]), torch.tensor(yes)),
                  sr=(p([0.4, 0.4, 0.2], [0.1, 0.1, 0.8]), torch.tensor(no)))
    pairs, batch = by_hand_pairs(tokens)
    terms = released_loss.released_objective(pairs, batch, train.Args(lambda_scr=2.0, answer_loss="vocab"))
    n = 4 * 2 + 2 * 2 + 2  # triplet 0: 4 pairs x 2 tokens; triplet 1: 2 x 2; the explanation: 2

    def ce(a, b):  # the cross-entropy of two answer tokens with probabilities a and b
        return -(math.log(a) + math.log(b))
    assert terms["l_real"].item() == pytest.approx((ce(0.7, 0.8) + ce(0.6, 0.8)) * 2 / n, abs=1e-6)
    assert terms["l_syn"].item() == pytest.approx(0.5 * (ce(0.5, 0.6) + ce(0.4, 0.8)) / n, abs=1e-6)
    assert terms["l_nle"].item() == pytest.approx(ce(0.5, 0.8) / n, abs=1e-6)
    assert terms["l_scr"].item() == pytest.approx(0.5 * 0.2 / 2, abs=1e-6)  # 2 half-triplets with a twin


# ---- training runs ------------------------------------------------------------------------------
def test_a_few_steps_lower_the_loss(video_llava_dir, toy, tmp_path):
    # every step sees the same 8 triplets (global batch 16 rows) without dropout: the logged losses compare
    train.main(make_args(video_llava_dir, *toy, tmp_path, batch_size=16, micro_batch_size=8, num_epochs=6,
                         lora_dropout=0.0, warmup_steps=0, lr=1e-3))
    log = read_log(tmp_path)
    assert [line["step"] for line in log] == [1, 2, 3, 4, 5, 6]
    # a random 2-layer model must learn motion to tell "right" from "left": the loss falls slowly
    # (2.806 -> 2.780 when written), but steadily
    assert log[-1]["loss"] < log[0]["loss"] - 0.015, [line["loss"] for line in log]
    assert all(line[k] > 0 for line in log for k in train.TERMS if k != "l_nle") and log[0]["l_nle"] == 0
    assert log[0]["loss"] == pytest.approx(log[0]["l_real"] + log[0]["l_syn"] + log[0]["l_scr"], abs=1e-5)
    assert json.load(open(tmp_path / "args.json"))["lambda_scr"] == 1.0


def test_zero_weights_remove_the_synthetic_terms_exactly(video_llava_dir, toy, tmp_path):
    csv, root = tiny_train.write_toy_set(os.path.dirname(os.path.dirname(toy[0])), weights=[0.0] * 8, name="w0.csv")
    kw = dict(num_epochs=1, lora_dropout=0.0)
    train.main(make_args(video_llava_dir, csv, root, tmp_path / "w0", **kw))
    train.main(make_args(video_llava_dir, csv, root, tmp_path / "real", use_syn=False, **kw))
    log = read_log(tmp_path / "w0")
    assert all(line["l_syn"] == 0.0 and line["l_scr"] == 0.0 for line in log)
    assert [line["loss"] for line in log] == pytest.approx([line["loss"] for line in read_log(tmp_path / "real")],
                                                           abs=1e-6)
    # the same gradients as the VideoCon baseline: the synthetic rows contribute nothing. (Not to the
    # last bit: a real video's row also holds its t' suffix here, which moves the scores by float
    # rounding, ~6e-8, and Adam turns that into ~3e-6 in the weights; a real contribution, ~lr = 1e-2.)
    assert_same_weights(lora_weights(tmp_path / "w0"), lora_weights(tmp_path / "real"), atol=2e-5)


def test_two_nodes_match_one_process(video_llava_dir, toy, reference, tmp_path):
    """Issue 36: two torchrun "nodes" (README's local two-node command), DDP's all-reduce between them."""
    out = tmp_path / "ddp"
    nodes = torchrun_nodes(
        os.path.join(ROOT, "03_train.py"), "--model", video_llava_dir, "--train_csv", toy[0], "--feedback_csv",
        feedback(toy), "--video_root", toy[1], "--out_dir", out, "--batch_size", "8", "--micro_batch_size", "4",
        "--num_epochs", "2", "--lr", "1e-2", "--warmup_steps", "1", "--num_workers", "1", "--save_every", "2",
        "--resume", env={"PYTHONPATH": ROOT})  # --resume: as on a cluster, where a requeued job continues
    printed, stderr = assert_ran(nodes), "".join(node.stderr for node in nodes)
    assert printed.count("--resume: no checkpoint in") == 1  # rank 0's choice, the same on both nodes
    assert printed.count("step 1 ") == 1  # rank 0 alone prints
    assert "6 steps of 8 rows = 2 processes x 1 micro-batch x 4" in printed  # issue 26: no "1 micro-batches"
    # issue 26: neither peft's FutureWarning nor transformers' use_cache line
    assert "is_gradient_checkpointing" not in stderr and "use_cache" not in stderr, stderr[-3000:]
    # 2 processes x 1 micro-batch == 1 process x 2 accumulated micro-batches, LoRA dropout included
    assert_same_weights(lora_weights(out), lora_weights(reference[0]), atol=1e-5)
    assert len(read_log(out)) == 6 and sum(line["l_nle"] > 0 for line in read_log(out)) >= 3  # explanations trained
    for mine, ref in zip(read_log(out), read_log(reference[0])):
        assert mine["loss"] == pytest.approx(ref["loss"], abs=1e-5) and mine["lr"] == ref["lr"]


def test_kill_and_resume_reaches_the_same_weights(video_llava_dir, toy, reference, tmp_path, monkeypatch):
    # "killed" after step 3: the checkpoint of step 2 is the latest, so step 3 is redone
    fb = feedback(toy)
    train.main(make_args(video_llava_dir, *toy, tmp_path, max_steps=3, feedback_csv=fb))
    assert os.listdir(tmp_path / "checkpoints") == ["step_0000002.pt"]
    assert [line["step"] for line in read_log(tmp_path)] == [1, 2, 3]
    # issue 36: a kill while rank 0 wrote step 4's checkpoint leaves its temporary file: not a checkpoint
    (tmp_path / "checkpoints" / "step_0000004.tmp123.pt").write_bytes(b"PK\x03\x04 cut short")
    with pytest.raises(ValueError, match="resume with the same settings"):
        train.main(make_args(video_llava_dir, *toy, tmp_path, resume=True, batch_size=16, feedback_csv=fb))
    # the rest with decoded videos kept in memory (--cache_videos): epoch 2 reads them from the cache
    calls = []
    read = video_io.read_video
    monkeypatch.setattr(video_io, "read_video", lambda path, *a: calls.append(path) or read(path, *a))
    train.main(make_args(video_llava_dir, *toy, tmp_path, resume=True, feedback_csv=fb, cache_videos=True))
    # each video decoded once in training (calls[0]: the one read that measures the prompts' positions)
    assert len(calls) - 1 == len(set(calls[1:])) > 0
    assert_same_weights(lora_weights(tmp_path), lora_weights(reference[0]), atol=1e-7)
    log, ref = read_log(tmp_path), read_log(reference[0])
    assert [line["step"] for line in log] == [1, 2, 3, 4, 5, 6]  # the killed run's step 3 is not logged twice
    assert [line["loss"] for line in log] == pytest.approx([line["loss"] for line in ref], abs=1e-7)
    assert [line["lr"] for line in log] == [line["lr"] for line in ref]


def test_saved_adapter_loads_with_peft_and_gives_the_same_scores(video_llava_dir, toy, reference):
    from peft import PeftModel
    out, trained = reference
    base, processor = video_llm.load_video_llm(video_llava_dir)
    videos = [tiny_train.tiny.moving_square(color=(255, 0, 0)), tiny_train.tiny.moving_square(direction=-1)]
    captions = ["a red square moves to the right", "a red square moves to the left", "a square moves to the left"]
    with torch.no_grad():
        before = tiny.alignment_logits(base, processor, videos, captions, [0, 0, 1])
        loaded = PeftModel.from_pretrained(base, str(out / "adapter")).eval()
        after = tiny.alignment_logits(loaded, processor, videos, captions, [0, 0, 1])
        ours = tiny.alignment_logits(trained.eval(), processor, videos, captions, [0, 0, 1])
    torch.testing.assert_close(after, ours, atol=1e-5, rtol=0)
    assert (after - before).abs().max() > 1e-3  # the adapter changed the scores
    # LoRA sits on the 7 linear layers of each of the 2 LLM layers, nowhere in the vision tower
    adapted = {n.rsplit(".lora_", 1)[0] for n, _ in loaded.named_parameters() if ".lora_" in n}
    assert len(adapted) == 7 * 2 and all(".language_model." in n for n in adapted)
    assert not any(p.requires_grad for n, p in trained.named_parameters() if "lora_" not in n)


def test_second_family_trains_through_the_same_code(onevision_dir, toy, tmp_path):
    rows = disk.read_csv(toy[0])  # plus a row whose video is missing: skipped, counted, listed
    disk.write_csv(tmp_path / "rows.csv", rows + [{**rows[0], "videopath": "gone.mp4"}])
    csv = os.path.join(os.path.dirname(toy[0]), "plus_one.csv")  # syn_video is relative to this folder
    os.replace(tmp_path / "rows.csv", csv)
    model = train.main(make_args(onevision_dir, csv, toy[1], tmp_path / "out", max_steps=1))
    assert disk.read_csv(tmp_path / "out" / "skipped.csv") == [
        {"file": csv, "line": "10", "videopath": "gone.mp4", "reason": "video not found: " + os.path.join(toy[1], "gone.mp4")}]
    (line,) = read_log(tmp_path / "out")
    assert all(math.isfinite(line[k]) and line[k] > 0 for k in train.TERMS if k != "l_nle")
    adapted = {n.rsplit(".lora_", 1)[0] for n, _ in model.named_parameters() if ".lora_" in n}
    assert len(adapted) == 7 * 2 and all(".language_model." in n for n in adapted)
    assert os.path.exists(tmp_path / "out" / "adapter" / "adapter_config.json")


def test_a_nan_loss_stops_the_run_naming_step_and_rows(video_llava_dir, toy, tmp_path):
    model, processor = video_llm.load_video_llm(video_llava_dir)
    with torch.no_grad():
        model.lm_head.weight.fill_(float("nan"))
    model.save_pretrained(tmp_path / "nan-model")
    processor.save_pretrained(tmp_path / "nan-model")
    with pytest.raises(FloatingPointError, match=r"step 1: non-finite loss .* on lines \[\('triplet', \d\), \('triplet', \d\)\] of .*weighted.csv"):
        train.main(make_args(str(tmp_path / "nan-model"), *toy, tmp_path / "out"))


def test_settings_that_cannot_make_the_global_batch_are_refused(video_llava_dir, toy, tmp_path):
    with pytest.raises(ValueError, match="--batch_size 8, --micro_batch_size 3, 1 process: 3 is odd"):
        train.main(make_args(video_llava_dir, *toy, tmp_path, micro_batch_size=3))
    with pytest.raises(ValueError, match="--micro_batch_size 1, 1 process: 1 is odd .* 2, 4 or 8 works"):
        train.main(make_args(video_llava_dir, *toy, tmp_path, micro_batch_size=1))
    with pytest.raises(ValueError, match="--micro_batch_size 6, 1 process: 6 x 1 does not divide 8; "):
        train.main(make_args(video_llava_dir, *toy, tmp_path, micro_batch_size=6))
    with pytest.raises(ValueError, match="16 usable rows, fewer than one --batch_size 32"):
        train.main(make_args(video_llava_dir, *toy, tmp_path, batch_size=32))
    with pytest.raises(ValueError, match="--answer_loss 'nope'"):
        train.main(make_args(video_llava_dir, *toy, tmp_path, answer_loss="nope"))


def test_a_micro_batch_no_triplet_fills_is_refused_and_each_step_trains_its_rows(tmp_path):
    """Issue 37 case 1: on 12 triplets, --batch_size 6 --micro_batch_size 3 printed "6 steps of 6 rows"
    while each step trained 4 (a triplet's 2 rows never fill 3): refused before any work, naming the
    sizes that work. With an even size, every step trains exactly --batch_size rows, an odd count of
    explanations included (the shuffled order's last one waits, as the tail does), on any process count."""
    csv, video_root = tiny_train.write_toy_set(str(tmp_path), n=12)
    done = tiny.run_main("03_train.py", "--model", tmp_path / "no-model", "--train_csv", csv, "--video_root",
                         video_root, "--out_dir", tmp_path / "out", "--batch_size", 6, "--micro_batch_size", 3)
    tiny.assert_user_error(done, "--batch_size 6, --micro_batch_size 3, 1 process: 3 is odd (a triplet is 2 rows, "
                                 "kept together); --micro_batch_size 2 or 6 works")
    assert not os.path.exists(tmp_path / "out")
    items = [dict(rows=2)] * 12 + [dict(rows=1)] * 3  # 27 rows
    for m, world in ((2, 1), (2, 3), (6, 1)):
        args = train.Args(batch_size=6, micro_batch_size=m, num_epochs=3, warmup_steps=0)
        plan, accum, total = training.micro_batch_plan(items, args, runs.Dist(world_size=world))
        assert total == 3 * 4  # 26 rows an epoch: 4 steps of 6, the rest dropped
        for step in range(total):
            ranks = [training.micro_batches(plan, step, accum, runs.Dist(rank=r, world_size=world)) for r in range(world)]
            assert sum(items[i]["rows"] for mbs in ranks for mb in mbs for i in mb) == 6, (m, world, step)


def test_a_prompt_past_the_model_positions_is_skipped_named_and_counted(video_llava_dir, toy, tmp_path, capsys):
    """Issue 26: a 5,000-word caption (a triplet) and explanation run past the tiny model's 1,024
    positions: each is left out, named by file:line in one printed line, listed in skipped.csv and
    counted in the summary beside the reader's exact duplicate, each row once. The measure counts the
    answer token fed under --answer_loss vocab."""
    rows, fb_rows, words = disk.read_csv(toy[0]), disk.read_csv(feedback(toy)), " ".join(["red"] * 5000)
    csv, fb = os.path.join(os.path.dirname(toy[0]), "long.csv"), str(tmp_path / "long_fb.csv")
    disk.write_csv(csv, rows + [rows[1], {**rows[0], "caption": words}])  # line 10: a duplicate; 11: too long
    disk.write_csv(fb, fb_rows + [{**fb_rows[0], "nle": words}])  # line 10: too long
    capsys.readouterr()
    train.main(make_args(video_llava_dir, csv, toy[1], tmp_path / "out", feedback_csv=fb, max_steps=1))
    skipped = disk.read_csv(tmp_path / "out" / "skipped.csv")
    assert [(s["file"], s["line"], s["videopath"], s["reason"][:16]) for s in skipped] == [
        (csv, "10", "", "exact duplicate "), (csv, "11", "real_0.mp4", "prompt too long:"),
        (fb, "10", "real_0.mp4", "prompt too long:")]
    assert skipped[1]["reason"].endswith("positions, the model has 1024")
    printed = capsys.readouterr().out
    assert f"2 row(s) skipped, prompt too long (past the model's 1024 positions): {csv}:11, {fb}:10" in printed
    assert ("8 triplets and 8 explanations train; skipped.csv lists 3 rows: 3 skipped (exact duplicate of an "
            "earlier row: 1, prompt too long: 2), 0 trained without their twin V^s (on L_real alone). 6 steps of "
            "8 rows = 1 process x 2 micro-batches x 4") in printed
    model, processor = video_llm.load_video_llm(video_llava_dir)
    items = synvita.triplets.load_triplets(train.Args(train_csv=toy[0], video_root=toy[1]))[0][:2]
    items += synvita.triplets.load_explanations(train.Args(feedback_csv=fb, video_root=toy[1]))[0][:1]
    two_way, vocab = (synvita.pairs.prompt_positions(model, processor, items, train.Args(answer_loss=loss))
                      for loss in ("two_way", "vocab"))
    assert [v - t for t, v in zip(two_way, vocab)] == [1, 1, 0] and max(vocab) < 1024  # Yes/No fed; an explanation's always


def test_a_row_dropped_for_its_long_prompt_is_listed_once_with_that_reason(video_llava_dir, toy, second_generator,
                                                                           capsys):
    """Issue 37 case 3: a triplet whose prompt runs past the model's positions and whose twin was not
    usable was listed twice in skipped.csv, once as "trained without a twin", false: it does not
    train. Each of its rows, in every --train_csv it is merged from, is listed once, as too long; the
    printed counts are the file's."""
    gen, words = os.path.dirname(toy[0]), " ".join(["red"] * 5000)
    one, two = disk.read_csv(toy[0]), disk.read_csv(second_generator)
    a, b = os.path.join(gen, "long_a.csv"), os.path.join(gen, "long_b.csv")  # syn_video: relative to gen/
    disk.write_csv(a, [{**one[0], "caption": words, "syn_video": ""}, {**one[1], "weight": ""}] + one[2:])
    disk.write_csv(b, [{**two[0], "caption": words}] + two[1:])  # the same long triplet, its twin usable
    args = train.Args(train_csv=[a, b], video_root=toy[1], batch_size=4, micro_batch_size=2)
    items, skipped = synvita.triplets.load_triplets(args)
    model, processor = video_llm.load_video_llm(video_llava_dir)
    items, skipped = synvita.pairs.drop_long_prompts(model, processor, items, skipped, args)
    too_long = "prompt too long"
    assert [(s["file"], s["line"], s["reason"][:15]) for s in skipped] == [
        (a, 3, synvita.triplets.NO_TWIN[:15]), (a, 2, too_long), (b, 2, too_long)]  # a's row 3: b's twin trains
    assert len(items) == 7 and all(t["caption"] != words for t in items)
    capsys.readouterr()
    training.print_data(items, skipped, 3, 1, args, runs.Dist())
    assert ("7 triplets and 0 explanations train; skipped.csv lists 3 rows: 2 skipped (prompt too long: 2), "
            "1 trained without their twin V^s.") in capsys.readouterr().out


def test_an_undecodable_video_stops_the_run_naming_its_row(video_llava_dir, toy, tmp_path):
    """Issue 26: a video that exists but cannot be decoded, met in a DataLoader worker mid-run, stops
    the run with one line naming the CSV's file:line and the video (no worker traceback in it)."""
    rows = disk.read_csv(toy[0])
    open(tmp_path / "broken.mp4", "wb").write(b"not a video")
    csv = os.path.join(os.path.dirname(toy[0]), "undecodable.csv")  # videopath: absolute, beside no other video
    disk.write_csv(csv, rows[:5] + [{**rows[5], "videopath": str(tmp_path / "broken.mp4")}] + rows[6:])
    with pytest.raises(common.UserError, match=f"undecodable.csv:7: {tmp_path}/broken.mp4: cannot decode video") as e:
        train.main(make_args(video_llava_dir, csv, toy[1], tmp_path / "out", num_epochs=1, num_workers=1))
    assert "Traceback" not in str(e.value) and "\n" not in str(e.value)


@pytest.fixture
def two_steps(video_llava_dir, toy, tmp_path):
    """An out_dir holding a run killed after step 2 (its checkpoint, args.json, log)."""
    train.main(make_args(video_llava_dir, *toy, tmp_path, max_steps=2))
    return tmp_path


def folder(path):
    """Every file under `path` with its bytes: {relative path: bytes}."""
    return {os.path.relpath(os.path.join(d, f), path): open(os.path.join(d, f), "rb").read()
            for d, _, files in os.walk(path) for f in files}


def test_a_new_run_touches_nothing_of_an_earlier_run(video_llava_dir, toy, two_steps):
    """Issue 14 items 2 and 16, issue 26: a new run (no --resume) in a folder that holds a run (here
    one stopped after step 2: its adapter, log and checkpoint) is refused before the model loads, in one
    line saying what to do; a --resume with a typo in --model is named. Not a byte there changes."""
    tmp_path = two_steps
    before = folder(tmp_path)
    assert {"adapter/adapter_config.json", "log.jsonl", "checkpoints/step_0000002.pt", "args.json"} <= set(before)
    with pytest.raises(common.UserError, match=f"{tmp_path} holds a run \\(adapter, log.jsonl, checkpoints/step_\\*.pt\\): "
                                               "pass --resume to continue it, another --out_dir, or delete it"):
        train.main(make_args(video_llava_dir, *toy, tmp_path, lr=1e-3))
    with pytest.raises(common.UserError, match=f"--model {tmp_path}/no-such-model: no such folder"):
        train.main(make_args(str(tmp_path / "no-such-model"), *toy, tmp_path, resume=True))
    # as a user runs it: exit status 2, one line, no traceback
    done = tiny.run_main("03_train.py", "--model", video_llava_dir, "--train_csv", toy[0], "--video_root", toy[1],
                         "--out_dir", tmp_path, "--batch_size", 8, "--micro_batch_size", 4)
    tiny.assert_user_error(done, f"{tmp_path} holds a run", "pass --resume")
    assert folder(tmp_path) == before


@pytest.mark.parametrize("bad", ["prompt", "syn_types", "batch", "column", "answer_loss"])
def test_every_check_runs_before_out_dir_is_touched(toy, tmp_path, bad):
    """Issue 26: a bad flag or input stops the run before the model loads (--model names no model
    here) and before anything is written to --out_dir (argparse refuses bad choices on the command
    line first; main(args) from Python refuses them too)."""
    rows, csv = disk.read_csv(toy[0]), os.path.join(os.path.dirname(toy[0]), f"bad_{bad}.csv")
    disk.write_csv(csv, {"column": [{k: v for k, v in r.items() if k != "weight"} for r in rows]}.get(bad, rows))
    kw, needle = {"prompt": (dict(prompt="Card"), "--prompt 'Card': use one of"),
                  "syn_types": (dict(syn_types=["acton"]), "--syn_types ['acton']: no row"),
                  "batch": (dict(micro_batch_size=3), "--batch_size 8, --micro_batch_size 3, 1 process: 3 is odd"),
                  "column": ({}, "missing column(s) ['weight']"),
                  "answer_loss": (dict(answer_loss="Vocab"), "--answer_loss 'Vocab': use one of")}[bad]
    with pytest.raises(common.UserError) as e:
        train.main(make_args(str(tmp_path / "no-model"), csv, toy[1], tmp_path / "out", **kw))
    assert needle in str(e.value) and not os.path.exists(tmp_path / "out")


def test_lora_dropout_and_out_dir_are_checked_before_any_work(toy, tmp_path):
    """Issue 37 case 5: --lora_dropout 1 (every LoRA input zeroed) and an --out_dir that runs through a
    file or is an input (--video_root spelled another way) stop the run in one line before anything is
    loaded or written."""
    base = ("03_train.py", "--model", tmp_path / "no-model", "--train_csv", toy[0], "--video_root", toy[1])
    before = open(toy[0], "rb").read()
    tiny.assert_user_error(tiny.run_main(*base, "--out_dir", tmp_path / "out", "--lora_dropout", 1),
                           "--lora_dropout 1.0: give a probability below 1")
    assert not os.path.exists(tmp_path / "out")
    tiny.assert_user_error(tiny.run_main(*base, "--out_dir", os.path.join(toy[0], "run")),
                           f"--out_dir {toy[0]}/run: {toy[0]} is a file, not a folder")
    tiny.assert_user_error(tiny.run_main(*base, "--out_dir", toy[1] + "/."),
                           f"--out_dir {toy[1]}/. is --video_root {toy[1]}: an output never replaces an input")
    assert open(toy[0], "rb").read() == before


def test_a_torn_last_log_line_is_dropped_and_a_changed_one_stops(video_llava_dir, toy, two_steps, capsys):
    """Issue 26: --resume after a log whose last line was cut (a kill or a full disk mid-write) drops
    that line, says so in one line, and logs on cleanly; a bad line before the last stops the resume,
    naming log.jsonl:line, before anything is written."""
    tmp_path, log = two_steps, two_steps / "log.jsonl"
    good = open(log).read()
    open(log, "w").write(good + '{"step": 3, "loss": 2.7')  # step 3's line, cut by a full disk
    train.main(make_args(video_llava_dir, *toy, tmp_path, resume=True))
    assert f"{log}:3: its last line was cut short" in capsys.readouterr().out
    assert [line["step"] for line in read_log(tmp_path)] == [1, 2, 3, 4]  # every line parses
    lines = open(log).read().splitlines()
    open(log, "w").write("\n".join(lines[:1] + ['{"step": 2, "lo'] + lines[2:]) + "\n")
    before = folder(tmp_path)
    with pytest.raises(common.UserError, match=f"{log}:2: not a line of this log"):
        train.main(make_args(video_llava_dir, *toy, tmp_path, resume=True))
    assert folder(tmp_path) == before


def test_a_full_disk_names_the_file_and_keeps_the_earlier_run(video_llava_dir, toy, two_steps, monkeypatch):
    """Issue 26: torch.save of a checkpoint and save_pretrained of the adapter failing as on a full
    disk stop with `<file>: cannot write it ...` (a UserError: `error: ...`, exit 2); the checkpoint of
    step 2 and the earlier adapter are intact, and no temporary file is left."""
    import errno
    import peft
    tmp_path = two_steps
    adapter = folder(tmp_path / "adapter")
    checkpoint = open(tmp_path / "checkpoints" / "step_0000002.pt", "rb").read()

    def full_disk(obj, f, *a, **kw):  # what torch's zip writer raises when the disk fills
        open(f, "wb").write(b"half")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")
    with monkeypatch.context() as m:
        m.setattr(torch, "save", full_disk)
        with pytest.raises(common.UserError, match=r"checkpoints/step_0000004.pt: cannot write it \(is the disk full"):
            train.main(make_args(video_llava_dir, *toy, tmp_path, resume=True))
    assert os.listdir(tmp_path / "checkpoints") == ["step_0000002.pt"]
    assert open(tmp_path / "checkpoints" / "step_0000002.pt", "rb").read() == checkpoint

    def no_space(self, path, *a, **kw):  # half an adapter written, then the disk is full
        os.makedirs(path)
        open(os.path.join(path, "adapter_config.json"), "w").write("{")
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(peft.PeftModel, "save_pretrained", no_space)
    with pytest.raises(common.UserError, match=r"adapter: cannot write it: No space left on device"):
        train.main(make_args(video_llava_dir, *toy, tmp_path, resume=True))
    assert folder(tmp_path / "adapter") == adapter and not [f for f in os.listdir(tmp_path) if ".tmp" in f]


def test_resume_checks_the_data_and_bad_schedules_are_refused(video_llava_dir, toy, two_steps):
    """Issue 14 items 4, 11, 16: --resume after the CSV's content changed (same row count) stops
    naming it; a 1-step run with a warm-up (lr 0) and --micro_batch_size 0 are refused with a message."""
    tmp_path = two_steps
    rows = disk.read_csv(toy[0])
    csv = os.path.join(os.path.dirname(toy[0]), "changed.csv")  # same rows, one weight changed
    disk.write_csv(csv, [{**rows[0], "weight": "0.125"}] + rows[1:])
    with pytest.raises(ValueError, match=r"written with other settings \(train_csv: '[0-9a-f]{64}' then, "):
        train.main(make_args(video_llava_dir, csv, toy[1], tmp_path, resume=True))
    with pytest.raises(ValueError, match="1 optimizer step with --warmup_steps 1: it runs at lr 0"):
        train.main(make_args(video_llava_dir, *toy, tmp_path / "warm", batch_size=16, num_epochs=1))
    with pytest.raises(ValueError, match=r"--micro_batch_size 0: give a number >= 1"):
        train.main(make_args(video_llava_dir, *toy, tmp_path / "zero", micro_batch_size=0))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_killed_run_leaves_no_dataloader_worker(video_llava_dir, toy, tmp_path):
    """Issue 14 item 15: SIGKILL the training process mid-run; its DataLoader workers end with it."""
    import signal
    import time
    cmd = [sys.executable, os.path.join(ROOT, "03_train.py"), "--model", video_llava_dir, "--train_csv", toy[0],
           "--video_root", toy[1], "--out_dir", str(tmp_path), "--batch_size", "4", "--micro_batch_size", "2",
           "--num_epochs", "50", "--warmup_steps", "1", "--num_workers", "2"]
    proc = subprocess.Popen(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 240
        while not (os.path.exists(tmp_path / "log.jsonl") and os.path.getsize(tmp_path / "log.jsonl")):
            assert proc.poll() is None and time.time() < deadline, "the run ended before its first step"
            time.sleep(0.2)
        time.sleep(2)  # the workers fill their prefetch queue
        workers = tiny.children(proc.pid)
        assert len(workers) == 2
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    deadline = time.time() + 20  # PyTorch's own watchdog would need >= 5 s, when it is not blocked
    while any(map(tiny.running, workers)) and time.time() < deadline:
        time.sleep(0.2)
    left = [w for w in workers if tiny.running(w)]
    for w in left:
        os.kill(w, signal.SIGKILL)
    assert not left, f"{len(left)} DataLoader worker(s) outlived the killed run"


# ---- Table 2: the twins of some misalignment types only; Table 5's "ALL": one twin per generator ----
def test_syn_types_keeps_every_real_triplet_and_the_twins_of_its_types(toy, capsys, monkeypatch):
    """Issue 25 item 4: --syn_types action trains every real triplet on L_real, and the twins of the
    action rows only (w as in the CSV); the others train without a twin, counted in one line by type,
    not skipped. A type that no row has is refused, naming the file's types."""
    rows = disk.read_csv(toy[0])
    kinds = ["action", "attribute", "object", " Action", "count", "action", "attribute", "object"]
    for r, kind in zip(rows, kinds):
        r["misalignment"] = kind
    csv = os.path.join(os.path.dirname(toy[0]), "types.csv")  # syn_video is relative to the CSV's folder
    disk.write_csv(csv, rows)
    capsys.readouterr()
    kept, skipped = synvita.triplets.load_triplets(train.Args(train_csv=csv, video_root=toy[1], syn_types=["action"]))
    assert [t["line"] for t in kept] == list(range(2, 10)) and skipped == []  # every triplet, none skipped
    action = [k.strip().lower() == "action" for k in kinds]
    for t, r, is_action in zip(kept, rows, action):
        if is_action:  # its twin, weighted as the CSV says
            assert t["syn"] == os.path.join(os.path.dirname(csv), r["syn_video"]) and t["w"] == float(r["weight"])
        else:  # a triplet without a twin: L_real alone
            assert t["syn"] is None and t["w"] == 0.0 and synvita.triplets.twins(t) == []
    assert sum(t["syn"] is not None for t in kept) == 3
    printed = capsys.readouterr().out
    assert ("--syn_types ['action']: 5 twin(s) of other misalignment types left out (attribute: 2, count: 1, "
            "object: 2); their triplets train on L_real alone (Table 2), not listed in skipped.csv") in printed
    # the pairs of a left-out twin's triplet are those of a triplet without a twin
    processor = types.SimpleNamespace(tokenizer=types.SimpleNamespace(eos_token_id=0))  # all pair_specs reads here
    specs = synvita.pairs.pair_specs(kept[:2], processor, "video_llava", dict(Yes=1, No=2), train.Args())
    assert [(s.item, s.name) for s in specs] == [(0, "rr"), (0, "rs"), (0, "ss"), (0, "sr"), (0, "r'"), (0, "s'"),
                                                 (1, "rr"), (1, "rs")]
    with pytest.raises(ValueError, match=r"--syn_types \['acton'\]: no row of .*types.csv has this misalignment; "
                                         r"its types: \[' Action', 'action', 'attribute', 'count', 'object'\]"):
        synvita.triplets.load_triplets(train.Args(train_csv=csv, video_root=toy[1], syn_types=["action", "acton"]))
    disk.write_csv(csv, [{k: v for k, v in r.items() if k != "misalignment"} for r in rows])
    with pytest.raises(ValueError, match=r"types.csv: missing column\(s\) \['misalignment'\]"):
        synvita.triplets.load_triplets(train.Args(train_csv=csv, video_root=toy[1], syn_types=["action"]))
    with pytest.raises(ValueError, match="needs --use_syn"):
        synvita.triplets.load_triplets(train.Args(train_csv=csv, video_root=toy[1], syn_types=["action"], use_syn=False))
    # the flags as typed: lists of names; one CSV is the same Args whether given as a str or a list
    monkeypatch.setitem(sys.modules, "train", train)  # where parse_args reads the fields' --help from
    args = runs.parse_args(train.Args, ["--syn_types", "action", "object", "--train_csv", "a.csv", "b.csv"])
    assert args.syn_types == ["action", "object"] and args.train_csv == ["a.csv", "b.csv"]
    assert train.Args(train_csv="a.csv") == train.Args(train_csv=["a.csv"])
    assert runs.parse_args(train.Args, []).train_csv == ["runs/generate/weighted.csv"]


@pytest.fixture(scope="module")
def second_generator(toy):
    """The toy set's 8 real triplets with another "generator's" twins and weights: the CSV's path."""
    return tiny_train.write_toy_set(os.path.dirname(os.path.dirname(toy[0])), name="gen2.csv", twin="gen2",
                                    twin_seed=200, weights=[0.5, 0.25, 0.0, 1.0, 0.75, 0.3, 0.6, 0.9])[0]


def test_several_csvs_merge_into_one_triplet_with_a_twin_from_each(toy, second_generator, tmp_path, capsys):
    """Issue 25 item 5 (Table 5's "ALL"): two CSVs of the same 8 real triplets give 8 triplets with 2
    twins each, each twin with its own phi; a triplet that only one CSV lists, or whose twin one CSV
    cannot give, is still one triplet, with the twins that exist."""
    gen = os.path.dirname(toy[0])
    capsys.readouterr()
    kept, skipped = synvita.triplets.load_triplets(train.Args(train_csv=[toy[0], second_generator], video_root=toy[1]))
    assert [t["line"] for t in kept] == list(range(2, 10)) and skipped == []
    one, two = disk.read_csv(toy[0]), disk.read_csv(second_generator)
    for t, a, b in zip(kept, one, two):
        assert (t["caption"], t["neg"]) == (a["caption"], a["neg_caption"]) and t["rows"] == 2  # its real part once
        assert synvita.triplets.twins(t) == [(os.path.join(gen, a["syn_video"]), float(a["weight"])),
                                  (os.path.join(gen, b["syn_video"]), float(b["weight"]))]
        assert (t["syn"], t["w"]) == synvita.triplets.twins(t)[0] and "gen2_" in synvita.triplets.twins(t)[1][0]
    assert "2 --train_csv files merged into 8 triplets; twins per triplet: {2: 8}" in capsys.readouterr().out
    # (b) CSV a has triplets 0-5, CSV b triplets 2-7, its row of triplet 3 without a usable twin
    a_csv, b_csv = str(tmp_path / "a.csv"), str(tmp_path / "b.csv")
    disk.write_csv(a_csv, [{**r, "syn_video": os.path.join(gen, r["syn_video"])} for r in one[:6]])
    disk.write_csv(b_csv, [{**r, "syn_video": os.path.join(gen, r["syn_video"])} for r in two[2:]])
    rows = disk.read_csv(b_csv)
    rows[1]["weight"] = ""  # triplet 3's twin in b: no weight
    disk.write_csv(b_csv, rows)
    kept, skipped = synvita.triplets.load_triplets(train.Args(train_csv=[a_csv, b_csv], video_root=toy[1]))
    assert [t["caption"] for t in kept] == [r["caption"] for r in one]  # a's order, then b's new ones
    assert [t["line"] for t in kept] == [2, 3, 4, 5, 6, 7, 6, 7]  # lines of the first CSV that lists it
    assert [len(synvita.triplets.twins(t)) for t in kept] == [1, 1, 2, 1, 2, 2, 1, 1]
    assert "gen2_" in synvita.triplets.twins(kept[6])[0][0] and synvita.triplets.twins(kept[6])[0][1] == 0.6  # b's only
    assert [(s["file"], s["line"], s["reason"]) for s in skipped] == [
        (b_csv, 3, synvita.triplets.NO_TWIN + "weight is missing")]
    with pytest.raises(ValueError, match="--train_csv: give one CSV, or one per generator"):
        synvita.triplets.load_triplets(train.Args(train_csv=[], video_root=toy[1]))


@torch.no_grad()
def test_every_twin_is_run_in_the_same_call(video_llava_dir, toy, second_generator):
    """A triplet with 2 twins runs rr, rs, ss, sr, r', s' and twin 1's ss1, sr1, s'1 (r' once), each
    equal to its pair scored alone; --answer_loss vocab feeds twin 1's answer tokens too."""
    model, processor = video_llm.load_video_llm(video_llava_dir)
    args = train.Args(train_csv=[toy[0], second_generator], video_root=toy[1], answer_loss="vocab")
    triplets, _ = synvita.triplets.load_triplets(args)
    batch, paths, frames = training.load_videos(triplets[:1], args)
    assert len(paths) == 3  # V^r and the two twins
    pairs = train.micro_batch_pairs(model, processor, batch, paths, frames, args)
    assert [name for _, name, *_ in pairs] == ["rr", "rs", "ss", "sr", "r'", "s'", "ss1", "sr1", "s'1"]
    r, (syn1, _) = batch[0], synvita.triplets.twins(batch[0])[1]
    for name, caption, other in (("ss1", r["neg"], None), ("sr1", r["caption"], None), ("s'1", r["neg"], r["caption"])):
        (a, tokens), = [(a, t) for _, n, a, t in pairs if n == name]
        hidden = [common.hidden_word_spans(caption, other) if other else None]
        alone = tiny.alignment_logits(model, processor, [frames[paths.index(syn1)]], [caption], hidden=hidden)
        assert a.item() == pytest.approx(alone.item(), abs=1e-5), name
        assert (tokens is None) == (other is not None)  # t' pairs carry no answer tokens


def two_twin_pairs(tokens=False):
    """Triplet 0 with 2 twins (phi 0.5 and 0.25), triplet 1 with 1 twin (phi 0.8), triplet 2 without,
    as Pairs of hand-picked scores f; with tokens, every entailment pair's [word, end] tokens, the
    target word at probability q = 1 - f / 2 and the end token at 0.8 (a 3-word vocabulary)."""
    f = {0: dict(rr=0.9, rs=0.4, ss=0.6, sr=0.3, **{"r'": 0.5, "s'": 0.5}, ss1=0.7, sr1=0.2, **{"s'1": 0.45}),
         1: dict(rr=0.8, rs=0.3, ss=0.55, sr=0.35, **{"r'": 0.65, "s'": 0.5}), 2: dict(rr=0.7, rs=0.1)}
    def answer(name, v):  # [word, end]: word 0 = Yes for rr and ss*, 1 = No for rs and sr*
        word = 0 if name[:2] in ("rr", "ss") else 1
        q, rows = 1 - v / 2, [[0.1, 0.1, 0.8], [0.1, 0.1, 0.8]]
        rows[0] = [q if c == word else (1 - q) / 2 for c in range(3)]
        return torch.log(torch.tensor(rows)), torch.tensor([word, 2])
    pairs = [(k, name, torch.tensor(logit(v)), answer(name, v) if tokens and "'" not in name else None)
             for k, scores in f.items() for name, v in scores.items()]
    batch = [dict(kind="triplet", syn="a0.mp4", w=0.5, more_twins=[("b0.mp4", 0.25)]),
             dict(kind="triplet", syn="a1.mp4", w=0.8), dict(kind="triplet", syn=None, w=0.0)]
    return pairs, batch, f


def hinge(own, shared, other):
    """Eq. (6) on one video, on scores f, gamma = 0.2: max(0, g + f' - f_own) + max(0, g + f_other - f')."""
    return max(0.0, 0.2 + shared - own) + max(0.0, 0.2 + other - shared)


def hinges(f, j=""):
    """Eq. (6)'s per-triplet sum with twin j ("" = the first): the hinges on V^s_j and on V^r."""
    return hinge(f["ss" + j], f["s'" + j], f["sr" + j]) + hinge(f["rr"], f["r'"], f["rs"])


def real_term(f):
    """Eq. (2)'s term of one triplet, on scores f."""
    return -(math.log(f["rr"]) + math.log(1 - f["rs"]))


def syn_term(f, j=""):
    """Eq. (5)'s term of one triplet's twin j, before its weight phi."""
    return -(math.log(f["ss" + j]) + math.log(1 - f["sr" + j]))


def test_objective_by_hand_with_several_twins():
    """Table 5's "ALL": L_real once per triplet; L_syn^phi and L_scr^phi the mean over a triplet's twins
    of its per-twin terms (two-way); the released loss counts each twin's tokens and half-triplets."""
    pairs, batch, f = two_twin_pairs()
    terms = train.objective(pairs, batch, train.Args(lambda_scr=2.0, gamma=0.2))
    l_real = (real_term(f[0]) + real_term(f[1]) + real_term(f[2])) / 3  # each triplet once, however many twins
    l_syn = ((0.5 * syn_term(f[0]) + 0.25 * syn_term(f[0], "1")) / 2 + 0.8 * syn_term(f[1])) / 3  # 0: mean of 2
    l_scr = ((0.5 * hinges(f[0]) + 0.25 * hinges(f[0], "1")) / 2 + 0.8 * hinges(f[1])) / 3
    for name, value in dict(l_real=l_real, l_syn=l_syn, l_scr=l_scr, l_nle=0.0).items():
        assert terms[name].item() == pytest.approx(value, abs=1e-6), name
    assert terms["loss"].item() == pytest.approx(l_real + l_syn + 2.0 * l_scr, abs=1e-6)
    # one twin of phi w weighs as much as two twins of phi w each
    same = [(0, "ss1", pairs[2][2], None), (0, "sr1", pairs[3][2], None), (0, "s'1", pairs[5][2], None)]
    doubled = train.objective(pairs[:6] + same, [dict(kind="triplet", syn="a.mp4", w=0.5, more_twins=[("b", 0.5)])],
                              train.Args())
    alone = train.objective(pairs[:6], [dict(kind="triplet", syn="a.mp4", w=0.5)], train.Args())
    for name in train.TERMS:
        assert doubled[name].item() == pytest.approx(alone[name].item(), abs=1e-6), name
    # --answer_loss vocab: one sum over every token (each twin's 4, weighted by its phi) / N
    pairs, batch, f = two_twin_pairs(tokens=True)
    terms = released_loss.released_objective(pairs, batch, train.Args(lambda_scr=2.0, answer_loss="vocab"))
    ce = {(k, name): -(math.log(1 - v / 2) + math.log(0.8)) for k, s in f.items() for name, v in s.items()}
    n = 3 * 4 + 3 * 4  # 3 triplets' rr, rs and 3 twins' ss, sr: 2 pairs x 2 tokens each
    assert terms["l_real"].item() == pytest.approx(sum(ce[k, x] for k in f for x in ("rr", "rs")) / n, abs=1e-6)
    l_syn = 0.5 * (ce[0, "ss"] + ce[0, "sr"]) + 0.25 * (ce[0, "ss1"] + ce[0, "sr1"]) + 0.8 * (ce[1, "ss"] + ce[1, "sr"])
    assert terms["l_syn"].item() == pytest.approx(l_syn / n, abs=1e-6)  # each twin's tokens, weighted by its phi
    # L_scr over the half-triplets with a twin, counted per twin: 3 twins, 6 half-triplets
    l_scr = (0.5 * hinges(f[0]) + 0.25 * hinges(f[0], "1") + 0.8 * hinges(f[1])) / 6
    assert terms["l_scr"].item() == pytest.approx(l_scr, abs=1e-6)
    assert terms["loss"].item() == pytest.approx(terms["l_real"].item() + terms["l_syn"].item() + 2 * l_scr, abs=1e-6)


def test_several_csvs_train_and_resume_only_with_the_same_list(video_llava_dir, toy, second_generator, two_steps):
    """Issue 25 item 5: a run on two CSVs trains every twin; --resume with another list of CSVs (one
    CSV, or the two in the other order) is refused, naming train_csv, and with the same list goes on."""
    tmp_path, both = two_steps, [toy[0], second_generator]  # two_steps: a 1-CSV run killed after step 2
    with pytest.raises(ValueError, match=r"written with other settings \(train_csv: '[0-9a-f]{64}' then, "
                                         r"\['[0-9a-f]{64}', '[0-9a-f]{64}'\] now"):
        train.main(make_args(video_llava_dir, both, toy[1], tmp_path, resume=True))
    out = tmp_path / "all"
    train.main(make_args(video_llava_dir, both, toy[1], out, max_steps=2, answer_loss="vocab"))
    with pytest.raises(ValueError, match=r"written with other settings \(train_csv: \['[0-9a-f]{64}', '[0-9a-f]"):
        train.main(make_args(video_llava_dir, both[::-1], toy[1], out, resume=True, answer_loss="vocab"))
    train.main(make_args(video_llava_dir, both, toy[1], out, resume=True, answer_loss="vocab"))
    log = read_log(out)
    assert [line["step"] for line in log] == [1, 2, 3, 4]
    assert all(math.isfinite(line[k]) and line[k] > 0 for line in log for k in train.TERMS if k != "l_nle")
    assert json.load(open(out / "args.json"))["train_csv"] == both
    assert json.load(open(tmp_path / "args.json"))["train_csv"] == toy[0]  # one CSV: a path, as before
    # one CSV records its hash as before --train_csv took a list, and no --syn_types: older checkpoints resume
    settings = checkpoints.checkpoint_settings(train.Args(train_csv=toy[0]), [])
    assert settings["train_csv"] == disk.file_hash(toy[0]) and "syn_types" not in settings
