"""toyworld.py: captions round-trip, the renderer draws what the caption says, and the toy
generator's failure and appearance rates match its flags."""
import random

import numpy as np
import pytest

import toyworld as tw


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
def test_things_move_in_the_stated_direction(motion, axis, sign):
    frames = tw.render(tw.parse_caption(f"a red square moves {motion}"))
    track = centre(frames, "red")[axis]
    assert (np.sign(np.diff(track)) == sign).all()


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
    perfect = tw.ToyGenerator(failure_rates={}, palette=False, texture=0.0, noise=0.0)
    np.testing.assert_array_equal(perfect(text, seed=5), tw.render(tw.parse_caption(text), seed=5))


def test_failure_rates_match_the_flags():
    rates = {"action": 0.3, "attribute": 0.1, "object": 0.0, "count": 0.5, "relation": 0.4, "flip": 0.6,
             "hallucination": 0.8}
    all_scenes, _ = scenes(600, seed=1)
    hits = {k: [] for k in rates}
    for i, scene in enumerate(all_scenes):
        for seed in range(5):
            _, wrong = tw.corrupt(scene, rates, random.Random(i * 10 + seed))
            for kind in rates:  # the rate is over the scenes where that failure can happen
                if tw.can_fail(scene, kind):
                    hits[kind].append(kind in wrong)
    for kind, rate in rates.items():
        assert np.mean(hits[kind]) == pytest.approx(rate, abs=0.05), kind


def test_flip_failure_draws_the_real_caption():
    real = tw.parse_caption("a red square moves right, then a blue circle moves left")
    asked = tw.negative(real, "flip", random.Random(0))
    drawn, wrong = tw.corrupt(asked, {"flip": 1.0}, random.Random(0))
    assert wrong == ["flip"] and drawn == real


def test_appearance_gap_flags():
    text = "a red square moves right"
    real = tw.render(tw.parse_caption(text), seed=0).astype(float)
    gap = tw.ToyGenerator(failure_rates={}, palette=False, texture=0.0, noise=20.0)(text, seed=0).astype(float)
    inside = (gap - real)[(real > 5) & (real < 235)]  # away from clipping at 0 and 255
    assert inside.std() == pytest.approx(20.0, rel=0.1)
    shifted = tw.ToyGenerator(failure_rates={}, texture=0.0, noise=0.0)(text, seed=0)
    assert centre(shifted, "red")[2].sum() == 0  # the real red is gone: another palette
    assert (np.abs(shifted.astype(int) - tw.SYNTHETIC_PALETTE["red"]).sum(-1) == 0).sum() == tw.FRAMES * tw.OBJ ** 2


def test_word_tokenizer_covers_every_caption():
    tok = tw.build_tokenizer()
    unk = tok.convert_tokens_to_ids("<unk>")
    for scene in scenes(100)[0]:
        assert unk not in tok(tw.caption(scene))["input_ids"]


def test_pretraining_runs_saves_and_loads(tmp_path):
    import common
    out = tw.pretrain_video_llm(str(tmp_path / "base"), steps=2, batch_size=2, log_every=1)
    model, processor = common.load_video_llm(out)
    result = tw.entailment_auc(model, processor, n=16)
    assert set(result) >= {"all"} and 0.0 <= result["all"] <= 1.0
    assert (tmp_path / "base" / "pretrain.json").exists()
