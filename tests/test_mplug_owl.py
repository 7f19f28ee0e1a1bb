"""mPLUG-Owl 7B (video), the paper's second model, rebuilt in synvita/mplug_owl.py: against VideoCon's own
modeling code (the numbers in tests/fixtures/mplug_owl_videocon.json), with three plausible mistakes that
the comparison must catch; VideoCon's prompt tokens and frame rule; Owl-Con's LoRA; 03 and 04 on it."""
import json
import os

import numpy as np
import pytest
import torch

import common
import tiny
from synvita import mplug_owl, video_io, video_llm

FIXTURE = json.load(open(tiny.MPLUG_FIXTURE))


def fixture_logits():
    """The fixture's model (its recipe's weights through convert_released) on its video and input ids:
    (logits (len(input_ids), vocab), the float64 sum of the vision tower's output)."""
    config = mplug_owl.MplugOwlConfig(**FIXTURE["config"])
    state = mplug_owl.convert_released(tiny.released_mplug_owl_state(FIXTURE), config)
    model = mplug_owl.MplugOwlForConditionalGeneration.from_pretrained(
        None, config=config, state_dict=state, dtype=torch.float32, attn_implementation="eager").eval()
    size = FIXTURE["config"]["vision_config"]["image_size"]
    pixels = torch.randn(1, 3, FIXTURE["frames"], size, size, generator=torch.Generator().manual_seed(FIXTURE["pixel_seed"]))
    pixels = pixels.permute(0, 2, 1, 3, 4)  # VideoCon's [B, C, T, H, W] -> ours [B, T, C, H, W]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([FIXTURE["input_ids"]]), pixel_values_videos=pixels).logits[0]
        return logits, model.model.vision_model(pixels).double().sum().item()


def test_the_model_gives_videocons_logits():
    """Measured: max |difference| 1.7e-6 on logits of ~1 (float32, 2026-12-07)."""
    logits, vision = fixture_logits()
    expected = torch.tensor(FIXTURE["logits"])
    assert logits.shape == expected.shape == (14, 128)
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=0)
    assert vision == pytest.approx(FIXTURE["vision_sum"], rel=1e-6)


def no_class_token_doubling(self, x):  # the adapter's class token zeroed: x + adapter(x) keeps it once
    out = MplugTemporal(self, x)
    return torch.cat([torch.zeros_like(out[:, :, :1]), out[:, :, 1:]], dim=2)


def residual_on_raw_queries(self, q, visual):  # the residual added to q instead of norm1(q)
    raw, normed = q, self.norm1(q)
    kv = torch.cat([normed, self.normk(visual)], dim=1)
    h = self.heads

    def heads(x):
        return x.view(*x.shape[:2], h, -1).transpose(1, 2)
    scores = heads(self.query(normed)) @ heads(self.key(kv)).transpose(-1, -2) / (q.shape[-1] // h) ** 0.5
    q = raw + self.out_proj((scores.softmax(-1) @ heads(self.value(kv))).transpose(1, 2).flatten(2))
    return q + self.w2(self.ffn_ln(torch.nn.functional.silu(self.w1(self.norm2(q))) * self.w3(self.norm2(q))))


MplugTemporal = mplug_owl.TemporalAdapter.forward


@pytest.mark.parametrize("mistake", ["no class token doubling", "naive qkv split", "residual on raw queries"])
def test_the_comparison_catches_a_plausible_mistake(mistake, monkeypatch):
    if mistake == "no class token doubling":
        monkeypatch.setattr(mplug_owl.TemporalAdapter, "forward", no_class_token_doubling)
    elif mistake == "naive qkv split":  # three consecutive thirds, not (heads, 3, head_dim)
        monkeypatch.setattr(mplug_owl, "split_fused_qkv", lambda tensor, heads: list(tensor.chunk(3)))
    else:
        monkeypatch.setattr(mplug_owl.AbstractorLayer, "forward", residual_on_raw_queries)
    logits, _ = fixture_logits()
    assert (logits - torch.tensor(FIXTURE["logits"])).abs().max() > 1e-3, mistake


@pytest.fixture(scope="module")
def owl_dir(tmp_path_factory):
    return tiny.tiny_mplug_owl(str(tmp_path_factory.mktemp("tiny-mplug-owl")))


def test_the_prompt_is_tokenized_piece_by_piece_as_videocon_does(owl_dir):
    """VideoCon's xgpt3_dataset.py: the prompt split at <|video|>, "AI: " and "\\nHuman: ", each piece
    encoded alone (it starts a word), one BOS; the answer is read after the lone "▁" of "AI: "."""
    _, processor = video_llm.load_video_llm(owl_dir)
    tok = processor.tokenizer
    text, start = common.entailment_prompt(processor, "mplug-owl", "a dog")
    assert text.endswith('\nHuman: <|video|>\nHuman: Does this video entail the description: "a dog"?\nAI: ')
    ids = tok(text)["input_ids"]
    assert ids[0] == 1 and ids.count(-2) == 1 and tok.sp.id_to_piece(ids[1]) == "▁The"
    after = [tok.sp.id_to_piece(i) for i in ids[ids.index(-2) + 1:]]
    assert after == ["▁", "<0x0A>", "H", "uman", ":", "▁", "▁Does", "▁this", "▁video", "▁ent", "ail", "▁the",
                     "▁description", ":", "▁\"", "a", "▁dog", "\"?", "<0x0A>", "▁AI", ":", "▁"]
    assert [tok.sp.id_to_piece(i) for i in common.answer_token_ids(tok, text)] == ["▁Yes", "▁No"]
    offsets = tok(text, return_offsets_mapping=True)["offset_mapping"]
    assert text[slice(*offsets[ids.index(tok.sp.piece_to_id("▁dog"))])] == " dog"  # t' is placed by these
    inputs = processor(text=text, videos=[tiny.moving_square()])
    assert (inputs["input_ids"] == -2).sum() == FIXTURE["config"]["num_query_tokens"] + 1  # 65 for the real model
    assert inputs["pixel_values_videos"].shape == (1, 8, 3, 32, 32)


def test_videocons_frame_rule():
    """processing_mplug_owl.get_index: seg = (N - 1) / 32, int(seg / 2) + round(seg * i); 300 frames:
    seg = 9.34375, so 4, 4 + 9, 4 + 19 (18.6875), ..., 4 + 290 (289.65625)."""
    idx = video_io.frame_indices(300, 32, "videocon")
    assert list(idx[:3]) == [4, 13, 23] and idx[-1] == 294 and len(idx) == 32
    assert list(video_io.frame_indices(32, 32, "videocon")) == [0] + [int(np.round(31 / 32 * i)) for i in range(1, 32)]


def owl_con_file(owl_dir, path, rank=4):
    """An Owl-Con-like checkpoint: the whole PEFT-wrapped state dict (base_model.model.<released name>),
    LoRA A and B on every LLM projection in old peft's naming; and the released weights with each
    projection merged by hand, W + (alpha / r) B A, alpha = 32."""
    base = torch.load(os.path.join(owl_dir, "pytorch_model.bin"))
    merged, wrapped, g = dict(base), {"base_model.model." + k: v for k, v in base.items()}, torch.Generator().manual_seed(5)
    for name, w in base.items():
        if name.startswith("language_model.model.layers") and name.endswith("_proj.weight"):
            a, b = torch.randn(rank, w.shape[1], generator=g) * 0.02, torch.randn(w.shape[0], rank, generator=g) * 0.02
            stem = "base_model.model." + name[: -len(".weight")]
            wrapped[stem + ".lora_A.weight"], wrapped[stem + ".lora_B.weight"] = a, b
            merged[name] = w + 32 / rank * b @ a
    torch.save(wrapped, path)
    return merged


def test_owl_con_loads_its_lora_exactly(owl_dir, tmp_path):
    merged = owl_con_file(owl_dir, tmp_path / "owl-con.bin")
    model, processor = video_llm.load_video_llm(owl_dir)
    with_lora = video_llm.load_adapter(model, str(tmp_path / "owl-con.bin"), owl_dir)
    merged_dir = tmp_path / "merged"
    merged_dir.mkdir()
    for name in os.listdir(owl_dir):  # the same checkpoint, its projections merged by hand
        if name != "pytorch_model.bin":
            os.symlink(os.path.join(owl_dir, name), merged_dir / name)
    torch.save(merged, merged_dir / "pytorch_model.bin")
    plain, _ = video_llm.load_video_llm(str(merged_dir))
    videos, captions = [tiny.moving_square(seed=0), tiny.moving_square(direction=-1, seed=1)], ["a red square", "a dog"]
    with torch.no_grad():
        ours, expected = (tiny.alignment_logits(m, processor, videos, captions) for m in (with_lora, plain))
        bare = tiny.alignment_logits(video_llm.load_video_llm(owl_dir)[0], processor, videos, captions)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=0)
    assert (ours - bare).abs().max() > 1e-3  # the LoRA moved the scores
    with pytest.raises(common.UserError, match="not a PEFT-wrapped mPLUG-Owl state dict"):
        torch.save({"x": torch.zeros(1)}, tmp_path / "other.bin")
        video_llm.load_adapter(video_llm.load_video_llm(owl_dir)[0], str(tmp_path / "other.bin"), owl_dir)


def test_03_trains_and_04_scores_with_it(owl_dir, tmp_path):
    """The CPU-sized run of README with --model <tiny mPLUG-Owl>: 03 trains a LoRA (VideoCon's frame
    rule, the linear schedule of the released mPLUG recipe), 04 scores with it and without."""
    import importlib
    import tiny_train
    train, evaluate = importlib.import_module("03_train"), importlib.import_module("04_eval")
    csv, root = tiny_train.write_toy_set(str(tmp_path / "toy"))
    train.main(train.Args(model=owl_dir, train_csv=csv, video_root=root, out_dir=str(tmp_path / "train"), batch_size=4,
                          micro_batch_size=2, warmup_steps=0, lr=1e-2, num_workers=0, num_frames=4,
                          frame_sampling="videocon", schedule="linear", lambda_scr=1e-2, weighting="difference"))
    log = [json.loads(line) for line in open(tmp_path / "train" / "log.jsonl")]
    assert len(log) == 4 and log[-1]["lr"] < log[1]["lr"]  # 8 triplets = 16 rows, 4 a step: linear decay
    from synvita import disk
    test_csv = str(tmp_path / "test.csv")  # the same triplets as an entailment test set (no split column)
    disk.write_csv(test_csv, [{k: r[k] for k in ("videopath", "caption", "neg_caption")} for r in disk.read_csv(csv)])
    scores = {}
    for name, adapter in (("base", ""), ("tuned", str(tmp_path / "train" / "adapter"))):
        results = evaluate.main(evaluate.Args(model=owl_dir, adapter=adapter, videocon_llm=test_csv, video_root=root,
                                              out_dir=str(tmp_path / name), num_frames=4, sampling="videocon"))
        assert results["videocon_llm"]["pairs_scored"] == 16
        scores[name] = open(tmp_path / name / "videocon_llm_scores.csv").read()
    assert scores["base"] != scores["tuned"]


def test_bf16_keeps_the_temporal_convolutions_in_float32(owl_dir):
    """The released code moved the depthwise Conv3d to the CPU in bf16; here the adapters stay float32 in a
    bf16 model, and the scores stay near the float32 model's."""
    full, processor = video_llm.load_video_llm(owl_dir)
    half, _ = video_llm.load_video_llm(owl_dir, dtype=torch.bfloat16)
    layer = half.model.vision_model.layers[0]
    assert layer.temporal.conv.weight.dtype == torch.float32 and layer.layer.self_attn.q_proj.weight.dtype == torch.bfloat16
    videos, captions = [tiny.moving_square(seed=0)], ["a red square moves to the right", "a dog"]
    with torch.no_grad():
        a32, a16 = (tiny.alignment_logits(m, processor, videos, captions, [0, 0]) for m in (full, half))
    assert a16.dtype == torch.float32 and (a16 - a32).abs().max() < 0.05
