"""shared_prefix.answer_states / alignment_logits (Eq. 1, each video's prompt prefix once, the caption
suffixes packed after it) against a plain forward of each whole prompt, for the four model families:
scores, t' masking, gradients under activation checkpointing, teacher-forced answer logits; and
Qwen2.5-VL (3-D rotary positions) through 03_train.py, one process and two."""
import os
import subprocess
import sys

import pytest
import torch

import common
import tiny

import test_train
from test_train import ROOT, train
from synvita import shared_prefix, video_llm

one_thread, toy = test_train.one_thread, test_train.toy  # test_train's fixtures: one torch thread, the 8-row toy set

FAMILIES = ["video_llava", "onevision", "qwen2_5_vl", "qwen3_vl", "mplug_owl"]
CAPTIONS = ["a red square moves to the right", "a dog", "the square moves left and then it stops quickly",
            "Covering [something] with [something]", "a blue square is thrown to the left"]


@pytest.fixture(scope="module")
def family_dir(request, tmp_path_factory):
    """family name -> a tiny random model directory, built once per module."""
    built = {}

    def get(name):
        if name not in built:
            if name in ("video_llava", "onevision"):
                built[name] = request.getfixturevalue(f"{name}_dir")
            elif name == "mplug_owl":  # the paper's second model, rebuilt in synvita/mplug_owl.py
                built[name] = tiny.tiny_mplug_owl(str(tmp_path_factory.mktemp(name)))
            else:
                built[name] = tiny.tiny_qwen_vl(str(tmp_path_factory.mktemp(name)), "2.5" if name == "qwen2_5_vl" else "3")
        return built[name]
    return get


def videos_for(family):
    """Two videos; Qwen-VL gets two frame sizes, so their prefixes differ in length (and positions)."""
    big = 48 if family.startswith("qwen") else 32
    return [tiny.moving_square(seed=0), tiny.moving_square(size=big, direction=-1, color=(0, 0, 255), seed=1)]


# the long way, by definition: the processor builds each whole prompt, one forward a pair
plain_logits = common.plain_answer_logits


def yes_no(processor, model, caption):
    return common.answer_token_ids(processor.tokenizer, common.entailment_prompt(processor, model.config.model_type, caption)[0])


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("per_row, window", [(0, 256), (2, 256), (0, 7)])  # rows of 2; attention windows of 7
@torch.no_grad()
def test_packed_scores_equal_a_plain_forward_of_each_prompt(family, per_row, window, family_dir, monkeypatch):
    monkeypatch.setattr(shared_prefix, "SUFFIX_WINDOW", window)  # 7: windows that cut suffixes (see shared_prefix_attention)
    model, processor = video_llm.load_video_llm(family_dir(family))
    videos, index = videos_for(family), [1, 0, 0, 1, 1, 0, 1]
    captions = [CAPTIONS[k % 5] for k in range(len(index))]
    hidden = [common.hidden_word_spans(c, "a square moves") if k in (2, 6) else None for k, c in enumerate(captions)]
    assert all(hidden[k] for k in (2, 6))
    a = tiny.alignment_logits(model, processor, videos, captions, index, hidden, per_row=per_row)
    assert a.dtype == torch.float32
    yes, no = yes_no(processor, model, captions[0])
    for i, (v, c) in enumerate(zip(index, captions)):
        row = plain_logits(model, processor, videos[v], c, hidden[i])[0]
        assert a[i].item() == pytest.approx((row[yes] - row[no]).item(), abs=1e-5), (family, i)
    assert a.std() > 1e-3 and abs(a[2] - a[1]) > 1e-4  # the pairs differ; t' hides words (pairs 1, 2: one caption)


@pytest.mark.parametrize("family", ["video_llava", "qwen2_5_vl", "mplug_owl"])
@torch.no_grad()
def test_teacher_forced_answer_logits_equal_a_plain_forward(family, family_dir):
    """Per-pair questions (another template, e.g. an explanation row's) and answer token ids fed after
    the prompt: the logits where the model predicts each answer token, full vocabulary."""
    model, processor = video_llm.load_video_llm(family_dir(family))
    videos, index = videos_for(family), [0, 1, 0]
    questions = [common.QUESTION, 'Why does this video not show "{caption}"?', common.QUESTION]
    tok = processor.tokenizer
    answers = [tok(" Yes", add_special_tokens=False)["input_ids"],
               tok(" Because the square moves to the left.", add_special_tokens=False)["input_ids"] + [tok.eos_token_id], []]
    states, logits = shared_prefix.answer_states(model, processor, videos, CAPTIONS[:3], index, questions=questions, answers=answers)
    for i, (v, c) in enumerate(zip(index, CAPTIONS[:3])):
        expected = plain_logits(model, processor, videos[v], c, question=questions[i], answer=answers[i])
        assert logits[i].shape == expected.shape == (max(1, len(answers[i])), model.config.get_text_config().vocab_size)
        torch.testing.assert_close(logits[i], expected, atol=1e-5, rtol=0)
        assert states[i].shape == (len(expected), model.config.get_text_config().hidden_size)
    assert len(answers[1]) > 5


@pytest.mark.parametrize("family", ["video_llava", "qwen2_5_vl", "qwen3_vl", "mplug_owl"])
def test_gradients_equal_a_plain_forward_under_activation_checkpointing(family, family_dir):
    """Training mode, checkpointed layers: the gradients of a loss over packed scores are those of the
    same loss over plain forwards, in a layer that only the prefix's keys reach (layer 0) and the LM head."""
    model, processor = video_llm.load_video_llm(family_dir(family))
    model.activation_checkpointing_enable()
    model.train()
    videos, index, captions = videos_for(family), [0, 1, 1, 0], CAPTIONS[:4]
    hidden = [None, None, common.hidden_word_spans(CAPTIONS[2], "the square stops"), None]
    yes, no = yes_no(processor, model, captions[0])
    weights = torch.tensor([1.0, -2.0, 0.5, 3.0])
    params = [model.model.language_model.layers[0].self_attn.q_proj.weight,
              model.model.language_model.layers[-1].mlp.down_proj.weight, model.lm_head.weight]

    def grads(a):
        model.zero_grad()
        (weights * a).sum().backward()
        return [p.grad.clone() for p in params]
    ours = grads(tiny.alignment_logits(model, processor, videos, captions, index, hidden))
    plain = torch.stack([(lambda r: r[yes] - r[no])(plain_logits(model, processor, videos[v], c, h)[0])
                         for v, c, h in zip(index, captions, hidden)])
    for mine, ref in zip(ours, grads(plain)):
        assert ref.abs().max() > 0
        torch.testing.assert_close(mine, ref, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
@torch.no_grad()
def test_other_attention_implementations_take_the_whole_square_mask(implementation, family_dir):
    from transformers import AutoModelForImageTextToText
    model, processor = video_llm.load_video_llm(family_dir("video_llava"))
    other = AutoModelForImageTextToText.from_pretrained(family_dir("video_llava"), attn_implementation=implementation)
    videos, index = videos_for("video_llava"), [0, 1, 1, 0]
    hidden = [None, common.hidden_word_spans(CAPTIONS[1], "a cat"), None, None]
    a = tiny.alignment_logits(model, processor, videos, CAPTIONS[:4], index, hidden)
    torch.testing.assert_close(tiny.alignment_logits(other, processor, videos, CAPTIONS[:4], index, hidden), a,
                               atol=1e-5, rtol=0)


def test_prompts_that_share_no_prefix_are_refused(family_dir):
    model, processor = video_llm.load_video_llm(family_dir("video_llava"))
    with pytest.raises(ValueError, match="share one prefix"):
        shared_prefix.answer_states(model, processor, videos_for("video_llava")[:1], ["a dog"], questions=["{caption} <video>"])


# ---- Qwen2.5-VL through 03_train.py -------------------------------------------------------------
def qwen_args(model, toy, out, **kw):
    return train.Args(model=model, train_csv=toy[0], video_root=toy[1], out_dir=str(out), batch_size=4,
                      micro_batch_size=2, num_epochs=1, max_steps=2, warmup_steps=1, lr=1e-2, num_workers=0, **kw)


def test_qwen_vl_trains_and_two_processes_match_one(family_dir, toy, tmp_path):
    from safetensors.torch import load_file
    qwen = family_dir("qwen2_5_vl")
    train.main(qwen_args(qwen, toy, tmp_path / "one"))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.join(ROOT, "03_train.py"), "--model", qwen, "--train_csv", toy[0], "--video_root", toy[1],
           "--out_dir", str(tmp_path / "two"), "--batch_size", "4", "--micro_batch_size", "2", "--num_epochs", "1",
           "--max_steps", "2", "--warmup_steps", "1", "--lr", "1e-2", "--num_workers", "0"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    one, two = (load_file(str(tmp_path / d / "adapter" / "adapter_model.safetensors")) for d in ("one", "two"))
    assert len(one) == 2 * 7 * 2  # LoRA A and B on 7 linear layers x 2 LLM layers
    for k in one:
        torch.testing.assert_close(two[k], one[k], atol=1e-5, rtol=0)
    lines = open(tmp_path / "one" / "log.jsonl").readlines()
    assert len(lines) == 2 and '"loss": NaN' not in lines[-1]


@torch.no_grad()
def test_yes_no_logits_are_float32_on_a_bf16_model(video_llava_dir):
    """Issue 13 item 6: in bf16 the two LM-head rows are applied in float32 to the final hidden state,
    so the scores are not the bf16 logits' coarse grid (which ties retrieval candidates)."""
    model, processor = video_llm.load_video_llm(video_llava_dir, dtype=torch.bfloat16)
    videos, captions = [tiny.moving_square(seed=0)], [CAPTIONS[k % 5] + " " * (k // 5) for k in range(20)]
    a = tiny.alignment_logits(model, processor, videos, captions, [0] * 20)
    states, logits = shared_prefix.answer_states(model, processor, videos, captions, [0] * 20)
    yes, no = yes_no(processor, model, captions[0])
    head = model.lm_head.weight[[yes, no]].float()
    exact = torch.stack([s[0].float() @ head.T for s in states])  # (20, 2), float32 from the bf16 states
    torch.testing.assert_close(a, exact[:, 0] - exact[:, 1], atol=1e-6, rtol=0)
    coarse = torch.stack([z[0, yes] - z[0, no] for z in logits])  # the bf16 logits, upcast afterwards
    assert a.dtype == torch.float32 and (a - coarse).abs().max() > 1e-5
