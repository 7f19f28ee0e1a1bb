"""common.py: every equation against numbers worked by hand, then the plumbing and the model."""
import json
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from transformers import AutoProcessor

import common
import tiny
from common import WEIGHTINGS, alignment_logit, alignment_score, hidden_word_spans, longest_common_subsequence, loss_real, loss_scr, loss_syn, token_visibility, total_loss
from synvita import disk, runs, shared_prefix, video_io, video_llm

T = torch.tensor


# ---- Eq. (1) ------------------------------------------------------------------------------------
def test_alignment_score_is_the_yes_no_ratio():
    ly, ln = T([2.0, 0.0, -1.0]), T([1.0, 0.0, 3.0])
    ratio = ly.exp() / (ly.exp() + ln.exp())
    assert torch.allclose(alignment_score(alignment_logit(ly, ln)), ratio)
    assert alignment_score(alignment_logit(T(1.0), T(0.0))).item() == pytest.approx(0.7310586, abs=1e-6)  # sigmoid(1)


def test_alignment_score_survives_huge_logits():
    f = alignment_score(alignment_logit(T([1e4, -1e4, 1e4]), T([-1e4, 1e4, 1e4])))
    assert torch.equal(f, T([1.0, 0.0, 0.5]))  # exp(1e4) would be inf; the sigmoid form is exact


# ---- Eqs. (2), (3), (5) -------------------------------------------------------------------------
def test_loss_real_by_hand():
    assert loss_real(T([0.0]), T([0.0])).item() == pytest.approx(2 * math.log(2))  # f = 0.5 twice
    # f(V,t+) = 0.75 and f(V,t-) = 0.25: -(log .75 + log .75)
    assert loss_real(T([math.log(3)]), T([-math.log(3)])).item() == pytest.approx(-2 * math.log(0.75))
    # a mean over examples, not a sum: the two examples above average
    both = loss_real(T([0.0, math.log(3)]), T([0.0, -math.log(3)]))
    assert both.item() == pytest.approx((2 * math.log(2) - 2 * math.log(0.75)) / 2)


def test_losses_are_finite_for_huge_logits():
    assert loss_real(T([1e4]), T([-1e4])).item() == 0.0  # perfectly right
    assert loss_real(T([-1e4]), T([1e4])).item() == pytest.approx(2e4)  # perfectly wrong, still finite
    assert loss_syn(T([-1e4]), T([-1e4])).item() == pytest.approx(1e4)


def test_loss_syn_matches_eq3_and_weighted_reduces_to_it():
    at, ar = T([0.3, -1.2, 2.0]), T([0.5, 0.1, -0.7])
    by_hand = -(torch.log(torch.sigmoid(at)) + torch.log(1 - torch.sigmoid(ar))).mean()
    assert loss_syn(at, ar).item() == pytest.approx(by_hand.item(), abs=1e-6)
    assert loss_syn(at, ar, torch.ones(3)).item() == pytest.approx(by_hand.item(), abs=1e-6)


def test_zero_weight_removes_an_example_exactly():
    at = T([0.3, -1.2], requires_grad=True)
    ar = T([0.5, 0.1], requires_grad=True)
    w = T([1.0, 0.0])
    loss = loss_syn(at, ar, w)
    term0 = -(torch.nn.functional.logsigmoid(at[0]) + torch.nn.functional.logsigmoid(-ar[0])) / 2
    assert loss.item() == pytest.approx(term0.item(), abs=1e-7)
    loss.backward()
    assert at.grad[1] == 0 and ar.grad[1] == 0
    assert loss_syn(at, ar, torch.zeros(2)).item() == 0.0


# ---- Eq. (6) ------------------------------------------------------------------------------------
def test_loss_scr_by_hand():
    # one example; column 0 = synthetic video, column 1 = real video; margin 0.2; the losses take
    # alignment logits: logit(f) gives back these scores f
    f_pos, f_shared, f_neg = (torch.logit(T(f)) for f in ([[0.9, 0.6]], [[0.5, 0.5]], [[0.4, 0.1]]))
    # z=s: relu(.2+.5-.9)=0 + relu(.2+.4-.5)=0.1 ; z=r: relu(.2+.5-.6)=0.1 + relu(.2+.1-.5)=0
    assert loss_scr(f_pos, f_shared, f_neg, T([1.0])).item() == pytest.approx(0.2)
    assert loss_scr(f_pos, f_shared, f_neg, T([0.5])).item() == pytest.approx(0.1)
    assert loss_scr(f_pos, f_shared, f_neg, T([1.0]), margin=0.0).item() == 0.0
    # mean over examples: a second example with w = 0 halves it
    two = loss_scr(f_pos.repeat(2, 1), f_shared.repeat(2, 1), f_neg.repeat(2, 1), T([1.0, 0.0]))
    assert two.item() == pytest.approx(0.1)


def test_loss_scr_identical_captions_cost_exactly_two_margins():
    # t^s == t^r: t' is the whole caption and all three scores coincide -> 2 * g per video
    a = torch.logit(T([[0.7, 0.3]]))
    assert loss_scr(a, a, a, T([1.0])).item() == pytest.approx(4 * 0.2)


def test_total_loss_eq7():
    assert total_loss(T(1.0), T(2.0), T(3.0), 0.01).item() == pytest.approx(3.03)
    assert total_loss(T(1.0), T(2.0), T(3.0), 1.0).item() == pytest.approx(6.0)


# ---- Eq. (4) and Table 4 ------------------------------------------------------------------------
F_TARGET = np.array([0.9, 0.6, 0.2, 0.5])
F_REAL = np.array([0.1, 0.7, 0.2, 0.25])
EXPECTED = {
    "fixed": [1.0, 1.0, 1.0, 1.0],
    "target": [0.9, 0.6, 0.2, 0.5],
    "target_x_inv_real": [0.81, 0.18, 0.16, 0.375],
    "indicator": [1.0, 0.0, 0.0, 1.0],
    "difference": [0.8, 0.0, 0.0, 0.25],
}


def test_table4_rows_by_hand():
    assert set(EXPECTED) <= set(WEIGHTINGS)
    for name, expected in EXPECTED.items():
        np.testing.assert_allclose(WEIGHTINGS[name](F_TARGET, F_REAL), expected, atol=1e-12, err_msg=name)


@pytest.mark.parametrize("name", sorted(WEIGHTINGS))  # a student's new entry is tested too
def test_every_weighting_is_usable_as_a_weight(name):
    fn = WEIGHTINGS[name]
    w_np = np.asarray(fn(F_TARGET, F_REAL), dtype=float)
    w_t = fn(torch.tensor(F_TARGET), torch.tensor(F_REAL))
    assert w_np.shape == F_TARGET.shape and torch.is_tensor(w_t)
    assert np.isfinite(w_np).all() and (w_np >= 0).all()
    np.testing.assert_allclose(w_t.numpy(), w_np)


# ---- footnote 2: LCS and t' ---------------------------------------------------------------------
def test_lcs_by_hand():
    assert len(longest_common_subsequence("ABCBDAB", "BDCABA")) == 4  # the textbook example
    assert "".join(longest_common_subsequence("AGGTAB", "GXTXAYB")) == "GTAB"
    assert longest_common_subsequence([1, 2, 3], [4, 5]) == []
    assert longest_common_subsequence([], [1]) == []
    assert longest_common_subsequence(list("same"), list("same")) == list("same")


# Caption pairs of VideoCon's seven misalignment types (the first is test.csv's real pair) and the
# words of the first caption that t' must hide.
PAIRS = [
    ("object", "A soccer team walking off the field while the audience claps.",
     "A basketball team walking off the field while the audience claps.", ["soccer"]),
    ("action", "A man is throwing a frisbee to the dog.", "A man is catching a frisbee from the dog.",
     ["throwing", "to"]),
    ("attribute", "A woman in a red dress dances on the stage.", "A woman in a blue dress dances on the stage.",
     ["red"]),
    ("count", "Two dogs run along the beach.", "Three dogs run along the beach.", ["Two"]),
    ("relation", "A cat sits on the table.", "A cat sits under the table.", ["on"]),
    ("flip", "A man opens the door and then walks in.", "A man walks in and then opens the door.",
     ["and", "then", "walks", "in"]),
    ("hallucination", "A boy rides a bike.", "A boy rides a bike while holding an umbrella.", []),
]


@pytest.mark.parametrize("kind,caption,other,hidden", PAIRS, ids=[p[0] for p in PAIRS])
def test_t_prime_hides_the_words_outside_the_lcs(kind, caption, other, hidden):
    assert [caption[s:e] for s, e in hidden_word_spans(caption, other)] == hidden
    # the hallucination's longer caption hides exactly its extra words
    if kind == "hallucination":
        assert [other[s:e] for s, e in hidden_word_spans(other, caption)] == ["while", "holding", "an", "umbrella"]


@pytest.fixture(scope="module")
def llama_tok():
    return tiny.llama_tokenizer()


@pytest.mark.parametrize("prompt", sorted(common.PROMPT_FORMATS))
def test_answer_ids_and_t_prime_on_a_real_llama_tokenizer(llama_tok, prompt):
    """On a real LLaMA-family SentencePiece tokenizer, in both Video-LLaVA prompts (the released one
    starts with LLaVA's system sentence): "Yes"/"No" after "ASSISTANT:" are the single tokens
    '▁Yes'/'▁No', and t' hides exactly the tokens of the words outside the LCS -- every token that
    holds a character of a hidden word, no token of a visible word, nothing outside the caption."""
    assert [llama_tok.convert_ids_to_tokens(i) for i in
            common.answer_token_ids(llama_tok, common.entailment_prompt(None, "video_llava", "a dog", prompt)[0])] \
        == ["▁Yes", "▁No"]
    # an explanation (VideoCon's example, final_test_nle.csv) follows its question's prompt token by token
    question = 'What is the misalignment between this video and the description: "{caption}"?'
    asked = common.entailment_prompt(None, "video_llava", "A basketball team walking off the field while the audience claps.",
                                     prompt, question)[0]
    nle = "a soccer team is walking off the field, not a basketball team."
    ids = common.answer_ids(llama_tok, asked, nle)
    assert llama_tok.decode(ids) == nle and llama_tok.convert_ids_to_tokens(ids[:2]) == ["▁a", "▁soccer"]
    assert llama_tok(asked + " " + nle)["input_ids"][-len(ids):] == ids  # as the whole text tokenises
    for kind, caption, other, words in PAIRS:
        text, start = common.entailment_prompt(None, "video_llava", caption, prompt)
        spans = [(s + start, e + start) for s, e in hidden_word_spans(caption, other)]
        enc = llama_tok(text, return_offsets_mapping=True)
        visible = token_visibility(enc["offset_mapping"], spans)
        hidden_chars = {c for s, e in spans for c in range(s, e)}
        word_chars = {c for m in common.WORD.finditer(text) for c in range(*m.span())}
        for (s, e), v in zip(enc["offset_mapping"], visible):
            chars = set(range(s, e))
            assert v == (not chars & hidden_chars), (kind, llama_tok.decode(enc["input_ids"]), s, e)
            assert v or not (chars & word_chars) - hidden_chars, (kind, s, e)  # no visible word's character hidden
        hidden = [llama_tok.convert_ids_to_tokens(i).lstrip("▁") for i, v in zip(enc["input_ids"], visible) if not v]
        assert "".join(hidden) == "".join(words), (kind, hidden)
        assert all(visible[: len(llama_tok(text[:start])["input_ids"]) - 1])  # the system sentence and question


def test_answer_token_loss_by_hand():
    # two answer tokens over a 3-word vocabulary: "Yes" (id 0) then the end token (id 2)
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.0, 3.0]])
    ce = [-math.log(math.exp(2) / (math.exp(2) + 2)), -math.log(math.exp(3) / (math.exp(3) + 2))]
    got = common.answer_token_loss(logits, torch.tensor([0, 2]), torch.tensor([1.0, 0.5]), n_tokens=4)
    assert got.item() == pytest.approx((ce[0] + 0.5 * ce[1]) / 4)  # divided by N, not by sum(w)
    assert common.answer_token_loss(logits, torch.tensor([0, 2]), torch.zeros(2), 4).item() == 0


def test_t_prime_edge_cases():
    assert hidden_word_spans("a red ball", "a red ball") == []  # identical: t' is the caption
    spans = hidden_word_spans("red ball", "blue cube")  # nothing shared: t' is empty
    assert [("red ball")[s:e] for s, e in spans] == ["red", "ball"]
    assert hidden_word_spans("", "anything") == []


def test_t_prime_maps_words_to_subword_tokens():
    tok = tiny.build_tokenizer()
    caption, other = "A man is throwing a frisbee to the dog.", "A man is catching a frisbee from the dog."
    enc = tok(caption, add_special_tokens=False, return_offsets_mapping=True)
    visible = token_visibility(enc["offset_mapping"], hidden_word_spans(caption, other))
    tokens = tok.convert_ids_to_tokens(enc["input_ids"])
    hidden_text = tok.convert_tokens_to_string([t for t, v in zip(tokens, visible) if not v])
    assert len(tokens) > len(caption.split())  # the tiny tokenizer really splits words
    assert hidden_text.split() == ["throwing", "to"]  # every piece of 'throwing' is hidden, nothing else


# ---- plumbing -----------------------------------------------------------------------------------
def test_frame_indices():
    assert list(video_io.frame_indices(10, 4, "uniform")) == [0, 3, 6, 9]
    assert list(video_io.frame_indices(32, 4, "middle")) == [4, 12, 20, 28]
    assert list(video_io.frame_indices(3, 8, "uniform")) == [0, 0, 0, 0, 1, 1, 1, 2]  # short clips repeat
    # truncated, not rounded, as the released code's np.linspace(0, n - 1, 8, dtype=int)
    assert list(video_io.frame_indices(300, 8, "uniform")) == [0, 42, 85, 128, 170, 213, 256, 299]
    with pytest.raises(ValueError, match="unknown frame sampling"):
        video_io.frame_indices(10, 4, "random")


def test_read_real_videocon_mp4(real_mp4):
    frames = video_io.read_video(real_mp4, num_frames=8)
    assert frames.shape == (8, 720, 1280, 3) and frames.dtype == np.uint8
    assert video_io.read_video(real_mp4, num_frames=32, sampling="middle").shape[0] == 32
    assert frames[0].std() > 0 and not np.array_equal(frames[0], frames[-1])  # real, moving content


def test_read_a_camera_like_mp4_made_here(tmp_path):
    """The clip a clone has in place of VideoCon's: 4 s of 30 fps 640x360 H.264 as a camera or YouTube
    writes it (x264's defaults: B-frames, a keyframe every 250 frames, so decoding seeks across
    predicted frames), each frame stamped with its index in a bright bar. Sampling reads the right
    frames: uniform (Video-LLaVA) and middle (VideoCon), including after a backward seek."""
    import av
    n, (h, w) = 120, (360, 640)
    path = str(tmp_path / "camera.mp4")
    rng = np.random.default_rng(0)
    scene = rng.integers(40, 200, (h // 8, w // 8, 3), dtype=np.uint8).repeat(8, 0).repeat(8, 1)  # a textured scene
    with av.open(path, "w") as container:
        stream = container.add_stream("libx264", rate=30)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        for i in range(n):
            frame = np.roll(scene, 4 * i, axis=1)  # the camera pans
            frame[:40, :] = 0
            frame[:40, i * (w // n): (i + 1) * (w // n)] = 255  # frame i's bar
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())

    def stamped(frames):  # the index each decoded frame carries
        return [int(np.argmax(f[:40].mean(axis=(0, 2))) // (w // n)) for f in frames]
    for num, sampling in ((8, "uniform"), (32, "middle"), (8, "uniform")):  # the last one seeks back
        frames = video_io.read_video(path, num_frames=num, sampling=sampling)
        assert frames.shape == (num, h, w, 3)
        assert stamped(frames) == list(video_io.frame_indices(n, num, sampling))


def test_write_then_read_video(tmp_path):
    path = str(tmp_path / "clip.mp4")
    frames = tiny.moving_square(num_frames=12, size=32)
    video_io.write_video(path, frames, fps=8)
    back = video_io.read_video(path, num_frames=12)
    assert back.shape == (12, 32, 32, 3)
    assert np.abs(back.astype(int) - frames.astype(int)).mean() < 12  # lossy codec, same picture
    assert os.listdir(tmp_path) == ["clip.mp4"]  # no temporary file left behind


def clips():
    """Frames that exercise the encoder's decisions: a moving square over a textured background
    that fades (brightness changes, motion, B-frames), at the toy world's sizes and one more."""
    rng = np.random.default_rng(7)
    for h, w in [(32, 32), (32, 64), (64, 96)]:
        texture = rng.integers(0, 256, (1, h, w, 3))
        fade = np.linspace(1.0, 0.4, 9)[:, None, None, None]
        frames = (texture * fade).astype(np.uint8)
        for t in range(9):
            frames[t, h // 4: h // 4 + 8, 3 * t: 3 * t + 8] = (250, 40, 40)
        yield f"{h}x{w}", frames


# x264 in plain C, one thread (video_io.X264_PARAMS), from the pinned PyAV wheel (requirements.txt): the
# same bytes on every x86_64 machine, whatever its SIMD. Recorded on an AMD EPYC with AVX2 (2026-12-06);
# CI's machines differ from session to session (some have AVX-512), so this compares machines.
# Another PyAV (another libx264) may change them: record them anew.
GOLDEN_MD5 = {"32x32": "79b75366c5023dfc73da4634c553bddb", "32x64": "65d344c7095122321eeeaf4eb9a586f8",
              "64x96": "596a38515935db6387d59732fd2c9c9e"}
WRITE_IN_ANOTHER_STATE = """
import os, sys
sys.path[:0] = [{root!r}, {tests!r}]
import torch
torch.set_flush_denormal(True)  # another floating-point control state (FTZ/DAZ) than the test's
x = torch.randn(512, 512)
(x @ x).sum(), [torch.randn(1000, 1000) for _ in range(8)]  # torch ran, and freed blocks fill the heap
os.sched_setaffinity(0, {{min(os.sched_getaffinity(0))}})  # one CPU
import test_common
from synvita import video_io
for name, frames in test_common.clips():
    video_io.write_video(os.path.join({out!r}, name + ".mp4"), frames)
"""


def test_the_same_frames_give_the_same_bytes_in_any_process(tmp_path):
    """01's promise (issue 23): the mp4 depends on the frames alone. The same frames, written here
    and in a process with another floating-point state, torch's kernels run before, a heap full of
    freed garbage (MALLOC_PERTURB_) and one CPU, give the same bytes; and on x86_64 the bytes
    recorded on another machine (GOLDEN_MD5)."""
    import hashlib
    import platform
    (tmp_path / "here").mkdir(), (tmp_path / "there").mkdir()
    for name, frames in clips():
        video_io.write_video(str(tmp_path / "here" / f"{name}.mp4"), frames)
    script = WRITE_IN_ANOTHER_STATE.format(root=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                           tests=os.path.dirname(os.path.abspath(__file__)), out=str(tmp_path / "there"))
    env = dict(os.environ, MALLOC_PERTURB_="165", OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    digests = {}
    for name, _ in clips():
        here, there = (tmp_path / d / f"{name}.mp4" for d in ("here", "there"))
        assert here.read_bytes() == there.read_bytes(), name
        digests[name] = hashlib.md5(here.read_bytes()).hexdigest()
    if platform.machine() == "x86_64":
        assert digests == GOLDEN_MD5, "the encoder's bytes differ from the recorded ones: is PyAV still av==18.1.0?"


def test_bad_videos_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.mp4"):
        video_io.read_video(str(tmp_path / "nowhere.mp4"))
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"not a video at all" * 10)
    with pytest.raises(ValueError, match="broken.mp4"):
        video_io.read_video(str(broken))


def test_atomic_path_leaves_nothing_on_failure(tmp_path):
    target = str(tmp_path / "out.csv")
    with pytest.raises(RuntimeError):
        with disk.atomic_path(target) as tmp:
            open(tmp, "w").write("half")
            raise RuntimeError("killed")
    assert os.listdir(tmp_path) == []
    disk.write_csv(target, [{"a": 1, "b": 2}, {"a": 3, "c": 4}])
    assert disk.read_csv(target, required=["a"]) == [{"a": "1", "b": "2", "c": ""}, {"a": "3", "b": "", "c": "4"}]
    with pytest.raises(ValueError, match=r"out.csv: missing column\(s\) \['neg_caption'\]"):
        disk.read_csv(target, required=["a", "neg_caption"])


def test_example_seed_depends_on_identity_only():
    assert runs.example_seed("v.mp4", "a cat") == runs.example_seed("v.mp4", "a cat")
    assert runs.example_seed("v.mp4", "a cat") != runs.example_seed("v.mp4", "a dog")
    assert runs.example_seed("v.mp4", "a cat", base=1) != runs.example_seed("v.mp4", "a cat")
    assert 0 <= runs.example_seed("x") < 2**31


def test_setup_distributed_without_torchrun(monkeypatch):
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)
    d = runs.setup_distributed()
    assert (d.rank, d.world_size, d.master) == (0, 1, True)


# ---- Eq. (1) on a real (tiny) video LLM ---------------------------------------------------------
def full_softmax_score(model, processor, video, caption):
    """f(V,t) the long way: the processor builds the inputs, the model returns every vocabulary
    logit at every position, and we take P(Yes) / (P(Yes) + P(No)) at the last one."""
    prompt, _ = common.entailment_prompt(processor, model.config.model_type, caption)
    inputs = processor(text=prompt, videos=[video], return_tensors="pt")
    probs = model(**inputs).logits[0, -1].softmax(-1)
    yes, no = common.answer_token_ids(processor.tokenizer, prompt)
    return (probs[yes] / (probs[yes] + probs[no])).item()


CAPTIONS = ["a red square moves to the right", "a dog", "the square moves left and then it stops quickly"]


@pytest.mark.parametrize("family", ["video_llava_dir", "onevision_dir"])
@torch.no_grad()
def test_alignment_score_equals_full_softmax_ratio(family, request):
    model, processor = video_llm.load_video_llm(request.getfixturevalue(family))
    videos = [tiny.moving_square(seed=0), tiny.moving_square(direction=-1, color=(0, 0, 255), seed=1)]
    index = [0, 1, 1]  # three captions of different lengths (left padding) on two videos
    f = alignment_score(tiny.alignment_logits(model, processor, videos, CAPTIONS, video_index=index))
    expected = [full_softmax_score(model, processor, videos[i], c) for i, c in zip(index, CAPTIONS)]
    np.testing.assert_allclose(f.numpy(), expected, atol=1e-5)
    assert f.std() > 0  # random weights still tell captions apart


@torch.no_grad()
def test_t_prime_equals_an_explicit_attention_mask(video_llava_dir):
    model, processor = video_llm.load_video_llm(video_llava_dir)
    video = tiny.moving_square()
    caption, other = PAIRS[1][1], PAIRS[1][2]
    spans = hidden_word_spans(caption, other)
    ours = tiny.alignment_logits(model, processor, [video, video], [caption, caption], hidden=[spans, None])
    # the long way: the processor builds the inputs (it expands <video>); then zero the attention
    # of the prompt tokens after the video that overlap a hidden word of the caption
    prompt, start = common.entailment_prompt(processor, "video_llava", caption)
    inputs = processor(text=prompt, videos=[video], return_tensors="pt")
    enc = processor.tokenizer(prompt, return_offsets_mapping=True)
    after_video = len(enc["input_ids"]) - 1 - enc["input_ids"].index(model.config.video_token_id)
    first = inputs["input_ids"].shape[1] - after_video
    assert inputs["input_ids"][0, first:].tolist() == enc["input_ids"][-after_video:]
    mask = inputs["attention_mask"].clone()
    for k, (s, e) in enumerate(enc["offset_mapping"][-after_video:]):
        if any(s < he + start and hs + start < e for hs, he in spans):
            mask[0, first + k] = 0
    assert (mask == 0).sum() >= 2  # at least 'throwing' and 'to'
    logits = model(**{**inputs, "attention_mask": mask}).logits[0, -1]
    yes, no = common.answer_token_ids(processor.tokenizer, prompt)
    assert ours[0].item() == pytest.approx((logits[yes] - logits[no]).item(), abs=1e-5)
    assert abs(ours[0] - ours[1]) > 1e-4  # hiding words changes the score


def test_video_llava_prompt_is_the_released_llava_v1_by_default(video_llava_dir):
    """The released code asks Video-LLaVA in LLaVA's llava_v1 conversation (system sentence first);
    --prompt card is the transformers model card's form; an unknown name is refused."""
    processor = AutoProcessor.from_pretrained(video_llava_dir)
    text, start = common.entailment_prompt(processor, "video_llava", "a dog")
    assert text == common.SYSTEM + ' USER: <video>\nDoes this video entail the description: "a dog"? ASSISTANT:'
    assert text[start:start + 5] == "a dog"
    card, start = common.entailment_prompt(processor, "video_llava", "a dog", prompt="card")
    assert card == 'USER: <video>\nDoes this video entail the description: "a dog"? ASSISTANT:' and card[start] == "a"
    with pytest.raises(ValueError, match="--prompt 'vicuna'"):
        common.entailment_prompt(processor, "video_llava", "a dog", prompt="vicuna")


def test_scores_have_gradients_for_training(video_llava_dir):
    model, processor = video_llm.load_video_llm(video_llava_dir)
    a = tiny.alignment_logits(model, processor, [tiny.moving_square()], ["a red square"])
    loss_real(a, -a).backward()
    assert model.lm_head.weight.grad is not None
    assert model.model.video_tower.embeddings.patch_embedding.weight.grad is None  # encoded under no_grad


def test_parse_args_reads_types_defaults_and_field_docstrings(capsys):
    import dataclasses

    @dataclasses.dataclass
    class Args:
        lambda_scr: float = 1.0
        """lambda_scr of Eq. (7)"""
        steps: int = 3
        """optimizer steps"""
        use_syn: bool = True
        """train on synthetic videos"""
        models: tuple = ("a", "b")
        """the ensemble"""
        out: str = "runs"

    args = runs.parse_args(Args, ["--lambda_scr", "0.01", "--no-use_syn", "--models", "x", "y", "z"])
    assert args == Args(lambda_scr=0.01, steps=3, use_syn=False, models=["x", "y", "z"], out="runs")
    with pytest.raises(SystemExit):
        runs.parse_args(Args, ["--help"])
    assert "lambda_scr of Eq. (7) (default: 1.0)" in capsys.readouterr().out


def test_shard_covers_every_item_once():
    items = list(range(10))
    parts = [runs.shard(items, runs.Dist(rank=r, world_size=3)) for r in range(3)]
    assert sorted(sum(parts, [])) == items and parts[1] == [1, 4, 7]


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXIT_THREADS = """
import os, sys
sys.path.insert(0, {root!r})
from synvita import runs
dist = runs.setup_distributed()
import transformers.modeling_utils  # imports torch.distributed.fsdp, as loading any model does
import torch
torch.distributed.barrier()
torch.distributed.destroy_process_group()
print(sorted(open(f"/proc/self/task/{{t}}/comm").read().strip() for t in os.listdir("/proc/self/task")))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_no_gloo_thread_outlives_destroy_process_group(tmp_path):
    """Issue 14 item 17: a rank ended with gloo's threads still running (transformers' imports kept
    the WORLD group alive past destroy_process_group), and some runs aborted at exit (SIGABRT from
    C++'s std::terminate). After destroy_process_group only the main thread is left."""
    script = tmp_path / "exit_threads.py"
    script.write_text(EXIT_THREADS.format(root=ROOT))
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(script)], env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("['python']") == 2, done.stdout  # no gloo_tcp_loop / pt_gloo_runloop thread


def test_prompt_lengths_count_the_video_tokens_and_the_caption(video_llava_dir):
    model, processor = video_llm.load_video_llm(video_llava_dir)
    video = tiny.moving_square()
    short, long = shared_prefix.prompt_lengths(model, processor, video, ["a red square", "a red square " * 400])
    prefix = shared_prefix.video_prefixes(model, processor, [video], *shared_prefix.prompt_suffixes(
        processor, model, ["x"], None, "llava_v1", None, None)[:2])[2][0]  # where the text after the video starts
    assert prefix < short < video_llm.max_positions(model) == 1024 < long


def test_check_outputs_refuses_an_output_that_is_an_input_however_named(tmp_path, monkeypatch):
    """Issue 37 item 4: an output is compared with each input by its real path (a symlink, `./`, a
    relative or absolute spelling), and a folder through an existing file is named."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "in.csv").write_text("a\n1\n")
    os.symlink(tmp_path / "in.csv", tmp_path / "link.csv")
    for output in ("in.csv", "./in.csv", str(tmp_path / "in.csv"), "link.csv", "sub/../in.csv"):
        with pytest.raises(common.UserError, match=f"--out_csv {re.escape(output)} is --generated_csv in.csv: an output never"):
            disk.check_outputs({"--out_csv": output}, {"--generated_csv": "in.csv"})
    with pytest.raises(common.UserError, match="--out_csv link.csv is --fig2_only in.csv"):  # a list of inputs
        disk.check_outputs({"--out_csv": "link.csv"}, {"--fig2_only": ["other.csv", "in.csv"]})
    with pytest.raises(common.UserError, match="--out_dir in.csv/runs: .*in.csv is a file, not a folder"):
        disk.check_outputs({"--out_dir": "in.csv/runs"}, {})
    disk.check_outputs({"--out_csv": "new/out.csv", "--out_dir": "new/run"}, {"--generated_csv": "in.csv"})  # fine
    assert sorted(os.listdir(tmp_path)) == ["in.csv", "link.csv"]  # a check writes nothing


def test_a_record_with_no_work_beside_it_does_not_refuse_the_corrected_command(tmp_path):
    """Issue 37: a first run stopped by a bad setting before its first result leaves its record; with
    kept=False (no work on disk) the corrected command's record replaces it, with work it refuses."""
    path = str(tmp_path / "resume.json")
    disk.check_resume(path, {"cache_interval": 0})
    with pytest.raises(common.UserError, match="cache_interval: 0 then, 4 now"):
        disk.check_resume(path, {"cache_interval": 4})  # kept=True: work made under the old record
    disk.check_resume(path, {"cache_interval": 4}, kept=False)
    assert json.load(open(path)) == {"cache_interval": 4}
