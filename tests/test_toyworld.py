"""toyworld/: captions round-trip, the renderer draws what the caption says, the toy generator's
failure and appearance rates match its flags, the biased world's training set has its negative-only
concepts, the committed models are the pretrained ones, and the one command runs end to end."""
import json
import os
import random
import sys

import numpy as np
import pytest

import common
import tiny
from toyworld import generator as tg
from toyworld import models as tm
from toyworld import run as tr
from toyworld import world as tw
from synvita import disk, tasks, video_io, video_llm, vqa


def scenes(n=300, seed=0):
    rng = random.Random(seed)
    return [tw.random_scene(rng) for _ in range(n)], rng


def test_captions_round_trip_and_every_negative_type_occurs():
    seen = set()
    for scene in scenes()[0]:
        text = tw.caption(scene)
        assert tw.parse_caption(text) == scene
        rng = random.Random(text)
        for kind in tw.negative_types(scene):
            neg = tw.negative(scene, kind, rng)
            assert tw.caption(neg) != text and tw.parse_caption(tw.caption(neg)) == neg
            seen.add(kind)
    assert seen == set(tw.TYPES)  # all seven VideoCon misalignment types


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="not a toy-world phrase: 'a purple square'"):
        tw.parse_caption("a purple square")
    with pytest.raises(ValueError, match="no 'flip' negative"):
        tw.negative(tw.parse_caption("a red square moves left"), "flip", random.Random(0))


def centre(frames, colour):
    """(x, y) centroid per frame of the pixels of one colour; NaN where absent."""
    mask = (np.abs(frames.astype(int) - tw.COLOURS[colour]).sum(-1) < 10)
    ys, xs = np.mgrid[: tw.SIZE, : tw.SIZE]
    n = mask.sum((1, 2))
    with np.errstate(invalid="ignore"):
        return (mask * xs).sum((1, 2)) / n, (mask * ys).sum((1, 2)) / n, n


@pytest.mark.parametrize("motion,axis,sign", [("right", 0, 1), ("left", 0, -1), ("down", 1, 1), ("up", 1, -1)])
def test_things_move_in_the_stated_direction_and_one_frame_shows_it(motion, axis, sign):
    frames = tw.render(tw.parse_caption(f"a red square moves {motion}"))
    track = centre(frames, "red")[axis]
    assert (np.sign(np.diff(track)) == sign).all()
    nose = (frames == tw.NOSE).all(-1)  # (FRAMES, SIZE, SIZE)
    trail = ((frames[4].astype(int) - frames[4].min(axis=(0, 1))).sum(-1) > 30) & ~nose[4]  # the thing, its fading copies
    ys, xs = np.nonzero(trail)
    assert sign * ((xs, ys)[axis].mean() - track[4]) < -1  # the trail lies behind the thing in a single frame
    for f in range(tw.FRAMES):  # and its nose, 2 x 3 pixels, ahead of it in every frame
        ys, xs = np.nonzero(nose[f])
        assert len(xs) == 6 and sign * ((xs, ys)[axis].mean() - track[f]) > tw.OBJ / 2


def test_events_happen_in_the_stated_order():
    frames = tw.render(tw.parse_caption("a red square moves right, then a blue circle moves left"))
    red_x, blue_x = centre(frames, "red")[0], centre(frames, "blue")[0]
    assert (np.diff(red_x[:4]) > 0).all() and (np.diff(red_x[4:]) == 0).all()  # first turn
    assert (np.diff(blue_x[:4]) == 0).all() and (np.diff(blue_x[4:]) < 0).all()  # second turn


@pytest.mark.parametrize("relation", ["above", "below"])
def test_relations_are_drawn(relation):
    frames = tw.render(tw.parse_caption(f"a yellow triangle moves left {relation} a green square"))
    above = centre(frames, "yellow")[1] < centre(frames, "green")[1]
    assert above.all() == (relation == "above") and (~above).all() == (relation == "below")


@pytest.mark.parametrize("count", [1, 2, 3])
def test_counts_are_drawn(count):
    word = tw.COUNTS[count]
    frames = tw.render(tw.parse_caption(f"{word} blue square{'s' if count > 1 else ''} move{'s' if count == 1 else ''} up"))
    assert (centre(frames, "blue")[2] == count * tw.OBJ * tw.OBJ).all()


def test_a_perfect_generator_draws_the_real_picture():
    text = "two green triangles move down"
    perfect = tg.ToyGenerator(failure_rates={}, palette=False, texture=0.0, noise=0.0)
    np.testing.assert_array_equal(perfect.draw(text, seed=5), tw.render(tw.parse_caption(text), seed=5))


def test_failure_rates_match_the_flags():
    rates = {"action": 0.3, "attribute": 0.1, "object": 0.0, "count": 0.5, "relation": 0.4, "flip": 0.6,
             "hallucination": 0.8}
    all_scenes, _ = scenes(600, seed=1)
    hits = {k: [] for k in rates}
    for i, scene in enumerate(all_scenes):
        for seed in range(5):
            _, wrong = tg.corrupt(scene, rates, random.Random(i * 10 + seed))
            for kind in rates:  # the rate is over the scenes where that failure can happen
                if tg.can_fail(scene, kind):
                    hits[kind].append(kind in wrong)
    for kind, rate in rates.items():
        assert np.mean(hits[kind]) == pytest.approx(rate, abs=0.05), kind


def test_flip_failure_draws_the_real_caption():
    real = tw.parse_caption("a red square moves right, then a blue circle moves left")
    asked = tw.negative(real, "flip", random.Random(0))
    drawn, wrong = tg.corrupt(asked, {"flip": 1.0}, random.Random(0))
    assert wrong == ["flip"] and drawn == real


def test_appearance_gap_flags():
    text = "a red square moves right"
    real = tw.render(tw.parse_caption(text), seed=0).astype(float)
    gap = tg.ToyGenerator(failure_rates={}, palette=False, texture=0.0, noise=20.0).draw(text, seed=0).astype(float)
    inside = (gap - real)[(real > 5) & (real < 235)]  # away from clipping at 0 and 255
    assert inside.std() == pytest.approx(20.0, rel=0.1)
    shifted = tg.ToyGenerator(failure_rates={}, texture=0.0, noise=0.0).draw(text, seed=0)
    assert centre(shifted, "red")[2].sum() == 0  # the real red is gone: another palette
    assert (np.abs(shifted.astype(int) - tg.SYNTHETIC_PALETTE["red"]).sum(-1) == 0).sum() == tw.FRAMES * tw.OBJ ** 2


def test_word_tokenizer_covers_every_caption_in_the_stages_prompt():
    tok = tm.build_tokenizer()
    unk = tok.convert_tokens_to_ids("<unk>")
    for scene in scenes(100)[0]:
        text, _ = common.entailment_prompt(None, "video_llava", tw.caption(scene))  # the default, llava_v1
        assert unk not in tok(text)["input_ids"], text


@pytest.mark.parametrize("kind, ask", [("video", True), ("video", False), ("vqa", True)])
def test_pretraining_runs_saves_and_loads(tmp_path, kind, ask):
    out = tm.pretrain(str(tmp_path / "models" / kind), kind, steps=2, batch_size=2, pool=6, log_every=1, ask=ask)
    model, processor = video_llm.load_video_llm(out)
    assert type(model).__name__ == {"video": "VideoLlavaForConditionalGeneration", "vqa": "LlavaForConditionalGeneration"}[kind]
    log = json.load(open(tmp_path / "models" / kind / "pretrain.json"))["log"]
    assert [sorted(r) for r in log] == [["answer", "lm", "prefix", "step"]] * 2
    assert all((r["answer"] > 0) == ask for r in log)  # not asked: no answer loss
    if kind == "video":
        result = tm.entailment_auc(model, processor, n=16)
        assert 0.0 <= result["all"] <= 100.0 and 0.0 <= tm.direction_naming(model, processor, n=8) <= 100.0


def test_prefix_labels_mark_where_the_negative_departs():
    """caption_losses' prefix targets: 1 on the positive's caption; on the negative, 1 up to the
    first token that differs from the caption, 0 from there on (flip: from the first colour)."""
    import torch
    tok = tm.build_tokenizer()
    pos, neg = 'x "a red square moves left" y', 'x "a blue square moves left, then a red circle moves up" y'
    ids = torch.tensor([[tok.pad_token_id] * 7 + tok(pos)["input_ids"], tok(neg)["input_ids"]])
    yes, no, quote = tok.convert_tokens_to_ids("Yes"), tok.convert_tokens_to_ids("No"), tok.convert_tokens_to_ids('"')
    logits = torch.zeros(2, ids.shape[1], len(tok))
    departed = torch.arange(ids.shape[1]) >= 4  # from the 5th token, "blue" (<s> x " a blue) on
    logits[1, :, no], logits[1, :, yes] = 50.0 * departed, 50.0 * ~departed
    logits[0, :, yes] = 50  # "Yes" all along the positive
    lm, prefix = tm.caption_losses(logits, ids, 1, yes, no, quote, tok.pad_token_id)
    assert prefix.item() < 1e-6  # exactly these targets
    after = torch.arange(ids.shape[1]) == ids.shape[1] - 1  # "y" after the closing quote: the question's tail
    logits[0, after, yes], logits[0, after, no] = 0.0, 50.0  # "No" there on the positive
    assert tm.caption_losses(logits, ids, 1, yes, no, quote, tok.pad_token_id)[1].item() > 1.0
    assert tm.caption_losses(logits, ids, 1, yes, no, quote, tok.pad_token_id, ask=False)[1].item() < 1e-6  # not asked
    logits[1, :, no], logits[1, :, yes] = 0.0, 50.0  # "Yes" where the negative has departed: a large loss
    assert tm.caption_losses(logits, ids, 1, yes, no, quote, tok.pad_token_id, ask=False)[1].item() > 1.0


def test_caption_lm_counts_direction_words_by_their_weight():
    """caption_losses' LM loss with word_weights(tok, 5): the mean over the opening quote and the
    caption's words in which the word that names a direction counts 5 times; with no weights the
    plain mean."""
    import torch
    import torch.nn.functional as F
    tok = tm.build_tokenizer()
    ids = torch.tensor([tok('x "a red square moves left" y')["input_ids"]] * 2)
    yes, no, quote = tok.convert_tokens_to_ids("Yes"), tok.convert_tokens_to_ids("No"), tok.convert_tokens_to_ids('"')
    logits = torch.randn(2, ids.shape[1], len(tok), generator=torch.Generator().manual_seed(0))
    per_word = F.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="none")
    w = (((ids[0] == quote).cumsum(0) == 1)[1:]).float()  # predicts '"a red square moves left'
    assert w.sum() == 6
    plain = tm.caption_losses(logits, ids, 1, yes, no, quote, tok.pad_token_id)[0]
    assert plain.item() == pytest.approx((per_word * w).sum().item() / 6)
    w[ids[0, 1:] == tok.convert_tokens_to_ids("left")] = 5.0
    weighted = tm.caption_losses(logits, ids, 1, yes, no, quote, tok.pad_token_id, tm.word_weights(tok, 5.0))[0]
    assert weighted.item() == pytest.approx((per_word * w).sum().item() / 10)


def test_the_biased_world_names_its_concepts_only_in_training_negatives(tmp_path):
    """The negative-only concepts (Fig. 1): never in a training positive nor shown by a training
    clip, named by training negatives and by test positives; the control world has no such bias."""
    biased = tw.write_world(str(tmp_path / "biased"), seed=0, n_train=200, n_test=60, ssv2_groups=1, atp_questions=2)
    train, test = disk.read_csv(biased["train"]), disk.read_csv(biased["videocon_llm"])
    assert not any(tw.names_negative_only(r["caption"]) for r in train)
    assert sum(tw.names_negative_only(r["neg_caption"]) for r in train) >= 10
    assert sum(tw.names_negative_only(r["caption"]) for r in test) >= 5
    control = tw.write_world(str(tmp_path / "control"), seed=0, n_train=200, n_test=60, ssv2_groups=1, atp_questions=2,
                             bias=False)
    control_train = disk.read_csv(control["train"])
    assert sum(tw.names_negative_only(r["caption"]) for r in control_train) >= 20  # shown and named as positives
    assert disk.read_csv(control["videocon_llm"]) == test  # both worlds share the test sets
    for files in (biased, control):  # no exact duplicate rows, no empty field
        for path in files.values():
            rows = [tuple(r.values()) for r in disk.read_csv(path)]
            assert len(set(rows)) == len(rows) and all(all(v.strip() for v in r) for r in rows), path


def test_world_files_have_the_real_layouts(tmp_path):
    """write_world's CSVs are read by 04_eval.py's own readers: every query has 16 candidates with
    its own clips as matches, every ATP question 5 statements, the answer among them."""
    import importlib
    evaluate = importlib.import_module("04_eval")
    files = tw.write_world(str(tmp_path), seed=3, n_train=12, n_test=10, ssv2_groups=2, atp_questions=4)
    train = disk.read_csv(files["train"])
    assert len(train) == 12 and {"videopath", "caption", "neg_caption", "misalignment"} <= set(train[0])
    assert all(tw.parse_caption(r["caption"]) and tw.parse_caption(r["neg_caption"]) for r in train)
    rows, _, pairs = tasks.read("ssv2_temporal", files["ssv2_temporal"])
    scores = {(r["videopath"], r["caption"]): float(r["match"]) for r in rows}  # a perfect scorer
    out = evaluate.retrieval(rows, scores, candidates=16)
    assert out["queries"] == 2 * 4 + 2 * 8 and out["queries_dropped"] == 0 and out["mAP"] == 100.0
    matches = {}  # every clip matches exactly one query: 4 clips per one-thing query, 2 per two-thing one
    for r in rows:
        matches.setdefault(r["videopath"], []).extend([r["caption"]] * int(r["match"]))
    assert all(len(m) == 1 for m in matches.values())
    per_query = {q: sum(m == [q] for m in matches.values()) for q in {r["caption"] for r in rows}}
    assert all(per_query[q] == (4 if len(tw.parse_caption(q).things) == 1 else 2) for q in per_query)
    atp, _, _ = tasks.read("atphard", files["atphard"])
    truth = {r["videopath"]: r for r in disk.read_csv(files["atphard"]) if r["option"] == r["answer"]}
    scores = {(r["videopath"], r["caption"]): float(r["caption"] == truth[r["videopath"]]["caption"]) for r in atp}
    types = {(r["video"], r["question"]): r["type"] for r in disk.read_csv(str(tmp_path / "nextqa-atphard.csv"))}
    acc = evaluate.atp_accuracy(atp, scores, types)
    assert acc["questions"] == 4 and acc["accuracy"] == 100.0 and acc["accuracy_T"] == 100.0
    assert len(os.listdir(tmp_path / "videos")) == 12 + 10 + 2 * 16 * 2 + 4


def test_01_generate_runs_the_toy_generator_by_name(tmp_path):
    """01_generate.py --pipeline toyworld.generator:ToyGenerator: one clip per row, drawn from the
    NEGATIVE caption (or, for a failure, the real one), with the row's seed; the flags reach G."""
    import importlib
    generate = importlib.import_module("01_generate")
    files = tw.write_world(str(tmp_path / "world"), seed=0, n_train=8, n_test=2, ssv2_groups=1, atp_questions=1)
    for rates, drawn in (({}, "neg_caption"), ({k: 1.0 for k in tw.TYPES}, None)):
        out = tmp_path / f"gen{len(rates)}"
        kwargs = {"failure_rates": rates, "palette": False, "texture": 0, "noise": 0}
        generate.main(generate.Args(input_csv=files["train"], out_dir=str(out), pipeline="toyworld.generator:ToyGenerator",
                                    pipeline_kwargs=json.dumps(kwargs)))
        rows = disk.read_csv(str(out / "generated.csv"))
        assert len(rows) == 8 and json.load(open(out / "generate_args.json"))["resolved"]["num_frames"] == tw.FRAMES
        for r in rows:
            clip = video_io.read_video(str(out / r["syn_video"]), tw.FRAMES).astype(float)
            scene = tg.corrupt(tw.parse_caption(r["neg_caption"]), rates, random.Random(int(r["seed"])))[0]
            if drawn:  # a perfect generator draws the negative caption itself
                assert scene == tw.parse_caption(r[drawn])
            assert np.abs(clip - tw.render(scene, seed=int(r["seed"]))).mean() < 8  # H.264's error only


def test_the_one_command_at_reduced_size(tmp_path):
    """`python -m toyworld.run` end to end (pretraining, world, 01 -> 02 -> 03 -> 04 in the workers,
    table, figures) at toy-toy size, two seeds: each cell of the table is the mean ± std of the
    runs' results.json; a stage run by a worker writes what `python 04_eval.py` writes."""
    import subprocess
    import sys
    rows = ["zero-shot", "SynViTA (Eq. 4 + L_scr)"]
    flags = dict(out_dir=tmp_path, models=tmp_path / "models", seeds=[0, 1], n_train=8, n_test=8, ssv2_groups=1,
                 atp_questions=2, base_steps=2, vqa_steps=2, pool=8, num_epochs=1, batch_size=4, rows=rows)
    argv = [a for k, v in flags.items() for a in [f"--{k}", *map(str, v if isinstance(v, list) else [v])]]
    out = subprocess.run([sys.executable, "-m", "toyworld.run", *argv], cwd=tr.ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    table = (tmp_path / "table.md").read_text()
    assert table.split("\n", 1)[1] in out.stdout
    args = tr.Args(**{**flags, "out_dir": str(tmp_path), "models": str(tmp_path / "models")})
    for method in rows:
        line = next(line for line in table.splitlines() if line.startswith(f"| {method} |"))
        auc = [json.load(open(os.path.join(tr.eval_dir(args, s, method), "results.json")))["results"]["videocon_llm"]["auc"]
               for s in args.seeds]
        assert f"{np.mean(auc):6.2f} ± {np.std(auc):5.2f}" in line
    assert "| negative-only concepts AUC |" in table.splitlines()[2] and "| flip |" in table
    assert (tmp_path / "table.png").stat().st_size > 0 and (tmp_path / "fig2.png").stat().st_size > 0
    # the worker ran 04_eval.py's main: the same scores as the script run on its own
    ev = tr.eval_dir(args, 1, rows[1])
    logged = open(os.path.join(ev, "04_eval.log")).readline().split()[2:]  # "$ 04_eval.py <argv>"
    logged[logged.index("--out_dir") + 1] = str(tmp_path / "again")
    again = tiny.run_main("04_eval.py", *logged, cwd=tr.ROOT)  # the stage's own entry point, in this process
    assert again.returncode == 0, again.stderr[-3000:]
    for name in ("videocon_llm_scores.csv", "ssv2_temporal_scores.csv"):
        assert sorted(disk.read_csv(os.path.join(ev, name)), key=str) == sorted(disk.read_csv(str(tmp_path / "again" / name)), key=str)


def test_paired_differences_mark_only_what_the_seeds_can_tell():
    """The claims table: seed-by-seed differences, their mean ± std, and a mark only when the 95%
    t-interval (t = 4.303 for 3 seeds) leaves out 0. By hand: differences 3, 4, 5 -> 4 ± 1, interval
    4 ± 4.303 / sqrt(3) = [1.52, 6.48]: ✓; 1, 2, 3 -> [-0.48, 4.48]: no mark; -5, -4, -3: ✗."""
    from toyworld import report
    base = {"VideoCon (Eq. 2)": 70.0, "SynViTA (Eq. 4 + L_scr)": 70.0, "SynViTA without L_scr": 70.0,
            "fixed + L_scr": 70.0, "T4.2 target + L_scr": 70.0, "unweighted synthetic (Eq. 3)": 70.0}
    add = {"SynViTA (Eq. 4 + L_scr)": [3, 4, 5], "SynViTA without L_scr": [2, 2, 2], "T4.2 target + L_scr": [-5, -4, -3]}
    per_seed = [{m: {key: v + add.get(m, [0, 0, 0])[i] for _, key in report.COLUMNS} for m, v in base.items()}
                for i in range(3)]
    compared = tr.comparisons(list(base))
    assert [(a, b) for a, b, _ in compared] == [
        ("SynViTA (Eq. 4 + L_scr)", "VideoCon (Eq. 2)"), ("unweighted synthetic (Eq. 3)", "VideoCon (Eq. 2)"),
        ("SynViTA (Eq. 4 + L_scr)", "SynViTA without L_scr"), ("SynViTA (Eq. 4 + L_scr)", "fixed + L_scr"),
        ("T4.2 target + L_scr", "fixed + L_scr")]
    table, raw = report.paired_table(compared, per_seed)
    lines = {tuple(line.split(" | ")[:2]): line for line in table.splitlines() if line.startswith("| ")}
    assert "|  +4.00 ± 1.00 ✓ |" in lines["| SynViTA (Eq. 4 + L_scr)", "VideoCon (Eq. 2)"]
    assert "|  +2.00 ± 1.00   |" in lines["| SynViTA (Eq. 4 + L_scr)", "SynViTA without L_scr"]  # 1, 2, 3
    assert "|  -4.00 ± 1.00 ✗ |" in lines["| T4.2 target + L_scr", "fixed + L_scr"]
    assert raw["SynViTA (Eq. 4 + L_scr) - SynViTA without L_scr | auc"] == [1, 2, 3]
    t2 = tr.comparisons(["VideoCon (Eq. 2)", "fixed + L_scr", "T2 action twins only"])  # Table 2: vs VideoCon
    assert [(a, b) for a, b, _ in t2] == [("T2 action twins only", "VideoCon (Eq. 2)")]
    mean, sd, (low, high) = report.interval([3, 4, 5])
    assert (mean, sd) == (4, 1) and low == pytest.approx(4 - 4.302653 / 3 ** 0.5, abs=1e-5)
    # issue 32: one seed has no spread: its tables print the values alone, no "± nan", no "± 0.00"
    table, _ = report.paired_table(compared, per_seed[:1])
    assert "nan" not in table and "±" not in table.split("\n", 1)[1] and "|  +3.00 |" in table
    main = report.tables(list(base), [{m: {**v, "auc_by_type": {}} for m, v in per_seed[0].items()}], [])
    assert "±" not in main and "|  73.00 |" in main


def test_a_rerun_with_other_settings_is_refused(tmp_path):
    tr.check_settings(tr.Args(out_dir=str(tmp_path)))
    tr.check_settings(tr.Args(out_dir=str(tmp_path), seeds=[5], rows=["VideoCon (Eq. 2)"], all_rows=True))  # fine
    with pytest.raises(ValueError, match=r"other settings \{'bias': \(True, False\)\}"):
        tr.check_settings(tr.Args(out_dir=str(tmp_path), bias=False))


def test_committed_toy_models_are_pretrained():
    """toyworld/pretrained/, which `python -m toyworld.run` uses, holds the models its settings
    pretrain: a base video LLM that was never asked the question (the design: headroom), whose caption
    LM names a mover's direction and whose answer is weak (overall) and at chance on direction edits,
    and three frame VQA members whose VQAScore P(Yes) tells a frame's caption from another clip's
    (random: AUC 0.5)."""
    from sklearn.metrics import roc_auc_score
    args = tr.Args()
    base = os.path.join(args.models, "base_video_llava")
    info = json.load(open(os.path.join(base, "pretrain.json")))
    assert (info["steps"], info["types"], info["pool"], info["prompt"], info["ask"]) == (
        args.base_steps, list(tm.BASE_TYPES), args.pool, tw.PROMPT, False)
    model, processor = video_llm.load_video_llm(base)
    auc = tm.entailment_auc(model, processor, n=128)
    # measured: all 66.3, action 52.0, attribute 82.1, count 72.2, relation 88.0; names direction 100 %
    assert auc["all"] < 75 and auc["action"] < 60 and min(auc["attribute"], auc["relation"]) > 70, auc
    assert tm.direction_naming(model, processor, n=64) > 80
    rng = random.Random(7)
    clips = [tw.random_scene(rng) for _ in range(32)]
    frames = [tw.render(s, seed=i)[rng.randrange(tw.FRAMES)] for i, s in enumerate(clips)]
    texts = [tw.caption(s) for s in clips] + [tw.caption(tw.random_scene(rng)) for _ in clips]
    for i in range(len(tm.VQA_MEMBERS)):
        member = os.path.join(args.models, f"vqa_{i}")
        info = json.load(open(os.path.join(member, "pretrain.json")))
        assert (info["steps"], info["types"], info["direction_weight"]) == (args.vqa_steps, tm.VQA_TYPES, tm.VQA_DIRECTION_WEIGHT)
        vqa_model, vqa_processor = video_llm.load_video_llm(member)
        p_yes = vqa.vqa_scores(vqa_model, vqa_processor, frames + frames, texts, pairs_per_forward=64).numpy()
        # > 0.8: vqa_1, pretrained with direction edits 4x as often, measured 0.84 here (random: 0.5)
        assert roc_auc_score([1] * 32 + [0] * 32, p_yes) > 0.8, (member, p_yes)


def test_no_seeds_only_makes_sure_the_models_are_there(tmp_path):
    """`python -m toyworld.run --seeds` (no value) pretrains missing models and records no settings
    in out_dir, so a later run there with other --models is not refused."""
    assert tr.main(tr.Args(out_dir=str(tmp_path), seeds=[])) == []
    assert not (tmp_path / "toyworld_args.json").exists()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_stopped_run_ends_its_workers(tmp_path):
    """SIGTERM (`kill`, a job scheduler; Ctrl-C is handled alike) to `python -m toyworld.run` while its
    workers are busy: it exits at once, says how to go on, leaves nothing for multiprocessing's resource
    tracker to clean up, and no worker outlives it; after SIGKILL too, the workers end themselves.
    Two runs side by side, one for each signal; their workers pretrain two models for a million steps."""
    import signal
    import subprocess
    import time
    started = {}
    for sig in ("SIGTERM", "SIGKILL"):
        models = tmp_path / sig / "models"
        argv = ["--out_dir", str(tmp_path / sig / "run"), "--models", str(models), "--seeds", "0", "--pool", "8",
                "--base_steps", str(10**6), "--vqa_steps", str(10**6)]
        started[sig] = models, subprocess.Popen([sys.executable, "-m", "toyworld.run", *argv], cwd=tr.ROOT,
                                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    outs, workers = {}, {}

    def busy(log):  # a worker in its pretraining loop: its progress bar is up
        return log.exists() and "pretrain toy" in log.read_text()
    try:
        for sig, (models, proc) in started.items():
            deadline = time.time() + 240
            while len([m for m in tm.MEMBERS if busy(models / "logs" / f"{m}.log")]) < 2:
                assert proc.poll() is None and time.time() < deadline, "pretraining never started"
                time.sleep(0.2)
            workers[sig] = tiny.descendants(proc.pid)  # the fork server, its workers (and the resource tracker)
            assert len(workers[sig]) >= 3, workers[sig]
            proc.send_signal(getattr(signal, sig))
            outs[sig], _ = proc.communicate(timeout=60)
            assert proc.returncode != 0
    finally:
        for _, proc in started.values():
            proc.kill()
    out = outs["SIGTERM"]
    assert "stopped: 1 of " in out and "the same command goes on" in out, out[-2000:]
    assert "leaked semaphore" not in out, out[-2000:]  # issue 32: tqdm's locks were semaphores, never unlinked
    deadline = time.time() + 10
    everyone = workers["SIGTERM"] + workers["SIGKILL"]
    while any(map(tiny.running, everyone)) and time.time() < deadline:
        time.sleep(0.2)
    assert not [w for w in everyone if tiny.running(w)], "a worker outlived the stopped run"
