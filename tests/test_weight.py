"""02_weight.py: VQAScore against the models' own softmax, batching, every weighting of Table 4 on
a table worked by hand, Fig. 2, bad input, resume, and a two-process torchrun run."""
import csv
import importlib
import importlib.util
import io
import json
import math
import os
import re
import shutil

import numpy as np
import pytest
import torch

import common
import tiny
import tiny_weight
from test_cluster import assert_ran, torchrun_nodes
from common import WEIGHTINGS
from synvita import clip_t5, disk, parts, score_cache, triplets, video_io, video_llm, vqa

weight = importlib.import_module("02_weight")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CAPTION, NEG = "a red square moves to the right", "a blue circle jumps"  # different lengths: padding happens


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory):
    return tiny_weight.tiny_llava(str(tmp_path_factory.mktemp("tiny-llava")))


@pytest.fixture(scope="module")
def instructblip_dir(tmp_path_factory):
    return tiny_weight.tiny_instructblip(str(tmp_path_factory.mktemp("tiny-instructblip")))


@pytest.fixture(scope="module")
def frames():
    return tiny.moving_square(num_frames=4, size=32)


def make_generated(folder, n=3, missing=(), corrupt=()):
    """A generated.csv as 01_generate.py writes it: syn_video relative to the CSV's folder."""
    os.makedirs(os.path.join(folder, "videos"), exist_ok=True)
    kinds = ["object", "flip", "action", "attribute"]
    rows = []
    for i in range(n):
        path = os.path.join(folder, "videos", f"{i}.mp4")
        if i in corrupt:
            open(path, "wb").write(b"this is not an mp4")
        elif i not in missing:
            video_io.write_video(path, tiny.moving_square(8, 32, color=(255, 60 * i, 0), direction=1 - 2 * (i % 2), seed=i))
        rows.append({"videopath": f"real/{i}.mp4", "caption": f"{CAPTION} {i}", "neg_caption": f"{NEG} {i}",
                     "misalignment": kinds[i % 4], "syn_video": f"videos/{i}.mp4", "seed": str(i)})
    disk.write_csv(os.path.join(folder, "generated.csv"), rows)
    return os.path.join(folder, "generated.csv")


def run(generated_csv, models, **kw):
    return weight.main(weight.Args(generated_csv=generated_csv, models=list(models), **kw))


def read(path):
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def test_only_training_rows_are_weighed_and_the_default_weighting_is_video_llavas(llava_dir, tmp_path, capsys):
    """02 weighs the --split rows only (counted in one line), with Table 4's row 3 by default: §6.2,
    "For Video-LLaVA, we use (3)", fbar(Vs,ts) (1 - fbar(Vs,tr))."""
    path = make_generated(str(tmp_path), n=3)
    rows = disk.read_csv(path)
    for r, split in zip(rows, ["train", "test", "Train"]):
        r["split"] = split
    disk.write_csv(path, rows)
    got = read(run(path, [llava_dir]))
    assert [r["videopath"] for r in got] == ["real/0.mp4", "real/2.mp4"]
    assert f"{path}: 1 row(s) of other splits left out (--split 'train'" in capsys.readouterr().out
    for r in got:
        ft, fr = float(r["score_syn_target"]), float(r["score_syn_real"])
        assert float(r["weight"]) == pytest.approx(ft * (1 - fr), abs=1e-12)


# ---- VQAScore from the model's full softmax, computed by hand: P(Yes), and t2v_metrics' exp(-CE) ----
# first_token: P(first answer token); t2v_metrics: exp(-mean cross-entropy) over "Yes" + the end token,
# which is what a model's own loss gives with those labels (t2v_metrics' recipe)
@pytest.mark.parametrize("vqascore", ["first_token", "t2v_metrics"])
def test_vqascore_decoder_only_from_the_full_softmax(llava_dir, frames, vqascore):
    model, processor = video_llm.load_video_llm(llava_dir)
    prompt = f'USER: <image>\nDoes this figure show "{CAPTION}"? Please answer yes or no. ASSISTANT:'
    inputs = processor(images=[frames[0]], text=[prompt], return_tensors="pt")
    yes, no = processor.tokenizer.convert_tokens_to_ids(["▁Yes", "▁No"])
    answer = [yes] if vqascore == "first_token" else [yes, processor.tokenizer.eos_token_id]
    ids = torch.cat([inputs["input_ids"], torch.tensor([answer])], 1)  # the prompt, then "Yes</s>"
    labels = torch.cat([torch.full_like(inputs["input_ids"], -100), torch.tensor([answer])], 1)
    with torch.no_grad():  # every position computed; the model's loss = mean CE over the answer
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=inputs["pixel_values"],
                    labels=labels)
    got = vqa.vqa_scores(model, processor, [frames[0]], [CAPTION], vqascore=vqascore)
    assert got.item() == pytest.approx(math.exp(-out.loss.item()), rel=1e-5)
    p = out.logits[0, inputs["input_ids"].shape[1] - 1].softmax(-1)  # where the answer starts
    assert got.item() != pytest.approx((p[yes] / (p[yes] + p[no])).item(), rel=1e-2)  # not Eq. (1)'s ratio


@pytest.fixture(scope="module")
def blip2_dir(tmp_path_factory):
    return tiny_weight.tiny_blip2(str(tmp_path_factory.mktemp("tiny-blip2")))


@pytest.fixture(scope="module")
def clip_flant5_dir(tmp_path_factory):
    return tiny_weight.tiny_clip_flant5(str(tmp_path_factory.mktemp("tiny-clip-flant5")))


@pytest.mark.parametrize("vqascore", ["first_token", "t2v_metrics"])
@pytest.mark.parametrize("which, form", [("instructblip_dir", "Question: {}"), ("blip2_dir", "Question: {} Answer:")])
def test_vqascore_encoder_decoder_from_the_decoders_softmax(which, form, vqascore, frames, request):
    model, processor = video_llm.load_video_llm(request.getfixturevalue(which))
    prompt = form.format(f'Does this figure show "{CAPTION}"? Please answer yes or no.')
    inputs = processor(images=[frames[1]], text=[prompt], return_tensors="pt")
    yes = processor.tokenizer.convert_tokens_to_ids("▁yes")
    labels = [[yes]] if vqascore == "first_token" else [[yes, processor.tokenizer.eos_token_id]]
    with torch.no_grad():  # T5's loss on the answer = mean -log P over its tokens, from the decoder's start
        loss = model(**inputs, labels=torch.tensor(labels)).loss
    got = vqa.vqa_scores(model, processor, [frames[1]], [CAPTION], vqascore=vqascore)
    assert got.item() == pytest.approx(math.exp(-loss.item()), rel=1e-5)


# ---- CLIP-FlanT5 (VQAScore's model) from its released checkpoint's layout -------------------------
@pytest.mark.parametrize("vqascore", ["first_token", "t2v_metrics"])
def test_clip_flant5_is_a_hand_assembled_forward_of_its_parts(clip_flant5_dir, frames, vqascore):
    """The checkpoint's tensors put together by hand as t2v_metrics does: the frame padded to a square
    of the mean colour, CLIP's layer -2 without CLS, mm_projector, the patches between the two sides
    of <image> (each tokenised with its </s>), T5 on those embeddings, its softmax over the
    tokenizer's tokens only (t2v_metrics shrinks T5's padded vocabulary to them)."""
    from safetensors.torch import load_file
    from transformers import (AutoTokenizer, CLIPImageProcessorPil, CLIPVisionConfig, CLIPVisionModel, T5Config,
                              T5ForConditionalGeneration)
    state = load_file(os.path.join(clip_flant5_dir, "model.safetensors"))
    config = json.load(open(os.path.join(clip_flant5_dir, "config.json")))

    def part(prefix):  # the weights under `prefix`, named without it
        return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    tower = CLIPVisionModel(CLIPVisionConfig.from_pretrained(config["mm_vision_tower"])).eval()
    tower.load_state_dict(part("vision_tower.vision_tower."))
    projector = torch.nn.Sequential(torch.nn.Linear(24, 32), torch.nn.GELU(), torch.nn.Linear(32, 32))
    projector.load_state_dict(part("mm_projector."))
    t5 = T5ForConditionalGeneration(T5Config.from_dict(config)).eval()
    t5.load_state_dict({k: v for k, v in state.items() if not k.startswith(("vision_tower.", "mm_projector."))})
    tok = AutoTokenizer.from_pretrained(clip_flant5_dir)
    image_processor = CLIPImageProcessorPil.from_pretrained(config["mm_vision_tower"])

    frame = frames[2][4:28]  # 24 x 32: padded to 32 x 32, rows 4..27 the frame, the rest the mean colour
    square = np.empty((32, 32, 3), np.uint8)
    square[:] = [int(255 * m) for m in image_processor.image_mean]
    square[4:28] = frame
    with torch.no_grad():
        pixels = image_processor(images=[square], return_tensors="pt")["pixel_values"]
        patches = projector(tower(pixels, output_hidden_states=True).hidden_states[-2][0, 1:])  # (16, 32)
        before = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives "
                  "helpful, detailed, and polite answers to the user's questions. USER: ")
        after = f'\nDoes this figure show "{CAPTION}"? Please answer yes or no. ASSISTANT: '
        embeds = torch.cat([t5.shared(torch.tensor(tok(before)["input_ids"])), patches,
                            t5.shared(torch.tensor(tok(after)["input_ids"]))])[None]
        answer = tok("Yes")["input_ids"]  # "▁Yes" "</s>"
        labels = torch.tensor(answer[:1] if vqascore == "first_token" else answer)
        decoder_input_ids = torch.tensor([[0] + labels[:-1].tolist()])  # T5 starts from <pad>
        logits = t5(inputs_embeds=embeds, decoder_input_ids=decoder_input_ids).logits[0, :, :len(tok)]
        expected = math.exp(-torch.nn.functional.cross_entropy(logits, labels).item())
    model, processor = clip_t5.load_member(clip_flant5_dir)
    assert type(model).__name__ == "CLIPFlanT5"
    got = vqa.vqa_scores(model, processor, [frame], [CAPTION], vqascore=vqascore)
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_clip_flant5_takes_a_missing_vision_tower_from_mm_vision_tower(clip_flant5_dir, frames, tmp_path):
    bare = tiny_weight.tiny_clip_flant5(str(tmp_path), with_tower=False)  # same seed: the same weights
    full, processor = clip_t5.load_member(clip_flant5_dir)
    model, _ = clip_t5.load_member(bare)
    a, b = (weight.score_video(m, processor, frames, NEG, CAPTION) for m in (full, model))
    np.testing.assert_allclose(np.array(a), np.array(b), rtol=1e-5)


def test_pad_to_square_centres_the_frame_on_the_colour():
    frame = np.arange(2 * 4 * 3, dtype=np.uint8).reshape(2, 4, 3)  # wide: rows are added above and below
    out = vqa.pad_to_square(frame, [7, 8, 9])
    assert out.shape == (4, 4, 3) and (out[1:3] == frame).all()
    assert (out[[0, 3]] == [7, 8, 9]).all()
    assert (vqa.pad_to_square(frame.transpose(1, 0, 2), [7, 8, 9])[:, 1:3] == frame.transpose(1, 0, 2)).all()


@pytest.mark.parametrize("vqascore", ["first_token", "t2v_metrics"])
@pytest.mark.parametrize("which", ["llava_dir", "instructblip_dir", "blip2_dir", "clip_flant5_dir"])
def test_batched_equals_one_at_a_time(which, vqascore, frames, request):
    model, processor = clip_t5.load_member(request.getfixturevalue(which))
    batched = weight.score_video(model, processor, frames, NEG, CAPTION, pairs_per_forward=8, vqascore=vqascore)
    single = weight.score_video(model, processor, frames, NEG, CAPTION, pairs_per_forward=1, vqascore=vqascore)
    np.testing.assert_allclose(np.array(batched), np.array(single), rtol=1e-4)
    assert len(set(batched[0])) > 1 and set(batched[0]).isdisjoint(batched[1])  # frames and captions matter


# ---- each frame encoded once: the same scores as one full forward per (frame, caption) pair ------
@pytest.mark.parametrize("vqascore", ["first_token", "t2v_metrics"])
@pytest.mark.parametrize("which", ["llava_dir", "instructblip_dir", "blip2_dir", "clip_flant5_dir"])
def test_each_frame_encoded_once_scores_as_pair_by_pair(which, vqascore, frames, request):
    """frame_scores (score_video's) = vqa_scores on each pair (t2v_metrics' way) to 1e-5, captions of
    different lengths (padding), 4 frames a call or 3 (a call of 3 frames, then 1); and the image side
    runs on T frames, not 2T pairs: a hook counts the rows its vision tower reads."""
    model, processor = clip_t5.load_member(request.getfixturevalue(which))
    captions = [NEG, CAPTION + " and then stops"]  # 4 and 11 words
    pairs = vqa.vqa_scores(model, processor, [f for _ in captions for f in frames],
                           [c for c in captions for _ in frames], 1, vqascore).view(2, 4)  # (caption, frame)
    tower = model.vision_tower.vision_tower if which == "clip_flant5_dir" else \
        model.vision_model if "blip" in which else model.model.vision_tower
    rows = []
    tower.register_forward_hook(lambda module, args, out: rows.append(len(out[0])))  # rows encoded
    for frames_per_forward in (4, 3):
        rows.clear()
        shared = vqa.frame_scores(model, processor, frames, captions, frames_per_forward, vqascore)
        np.testing.assert_allclose(shared.numpy(), pairs.numpy(), rtol=1e-5, atol=0)
        assert sum(rows) == len(frames), rows  # each frame once
    assert len(set(pairs[0].tolist())) > 1 and set(pairs[0].tolist()).isdisjoint(pairs[1].tolist())


def test_llava_runs_the_image_prefix_once_per_frame(llava_dir, frames):
    """LLaVA: the prompt through the image's tokens (the same for both captions) runs once per frame;
    the second call reads its KV and holds only the captions' suffixes."""
    model, processor = clip_t5.load_member(llava_dir)
    lengths = []
    model.model.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: lengths.append(tuple(kwargs["inputs_embeds"].shape[:2])), with_kwargs=True)
    vqa.frame_scores(model, processor, frames, [NEG, CAPTION], 4)
    prompt = processor(images=[frames[0]], text=[vqa.vqa_prompt(processor, "llava", CAPTION)[0]])["input_ids"][0]
    prefix = max(i for i, t in enumerate(prompt) if t == model.config.image_token_id) + 1
    assert lengths[0] == (4, prefix)  # 4 frames x the prefix
    assert lengths[1][0] == 8 and lengths[1][1] == len(prompt) - prefix  # 8 pairs x the longer suffix


# ---- guards: a BLIP processor that puts no image tokens in the prompt -----------------------------
@pytest.mark.parametrize("which", ["instructblip_dir", "blip2_dir"])
def test_a_processor_without_num_query_tokens_is_refused(which, frames, request, tmp_path):
    """A checkpoint whose processor_config.json lacks num_query_tokens: BLIP-2's processor then puts no
    image token in the prompt (transformers would score the text alone), InstructBLIP's crashes."""
    folder = shutil.copytree(request.getfixturevalue(which), tmp_path / "ckpt")
    config = json.loads((folder / "processor_config.json").read_text())
    del config["num_query_tokens"]
    (folder / "processor_config.json").write_text(json.dumps(config))
    model, processor = clip_t5.load_member(str(folder))
    with pytest.raises(ValueError, match="num_query_tokens None, the model.s 4"):
        vqa.vqa_scores(model, processor, [frames[0]], [CAPTION])


def test_image_tokens_of_another_id_are_refused(blip2_dir, frames):
    model, processor = clip_t5.load_member(blip2_dir)
    model.config.image_token_index += 1  # the tokenizer's <image> is not the model's image token
    with pytest.raises(ValueError, match=r"do not hold 4 image tokens"):
        vqa.vqa_scores(model, processor, [frames[0]], [CAPTION])


def test_help_lists_the_papers_three_members():
    out = tiny.run_main("02_weight.py", "--help", env={"COLUMNS": "500"}).stdout  # one line a flag
    members = ["Salesforce/instructblip-flan-t5-xxl", "zhiqiulin/clip-flant5-xxl", "llava-hf/llava-1.5-13b-hf"]
    assert f"(default: {' '.join(members)})" in out  # as typed on the command line


def test_a_nan_score_is_an_error_not_a_weight(llava_dir, frames, monkeypatch):
    model, processor = video_llm.load_video_llm(llava_dir)
    monkeypatch.setattr(vqa, "frame_scores", lambda *a, **k: torch.tensor([[0.5] * 4, [0.5] * 3 + [float("nan")]]))
    with pytest.raises(ValueError, match="non-finite"):
        weight.score_video(model, processor, frames, NEG, CAPTION)


# ---- Table 4 / Eq. (4) on a table worked by hand -----------------------------------------------
# Two models, two frames. Row 0: fbar_t = mean(0.7, 0.5) = 0.6, fbar_r = mean(0.3, 0.2) = 0.25;
# row 1: fbar_t = 0.25, fbar_r = 0.6; row 2: fbar_t = fbar_r = 0.4.
CACHE = {"m1": [([0.8, 0.6], [0.2, 0.4]), ([0.2, 0.2], [0.6, 0.8]), ([0.5, 0.5], [0.5, 0.5])],
         "m2": [([0.5, 0.5], [0.1, 0.3]), ([0.4, 0.2], [0.5, 0.5]), ([0.3, 0.3], [0.3, 0.3])]}
FT, FR = [0.6, 0.25, 0.4], [0.25, 0.6, 0.4]
EXPECTED = {"fixed": [1.0, 1.0, 1.0], "target": [0.6, 0.25, 0.4],
            "target_x_inv_real": [0.6 * 0.75, 0.25 * 0.4, 0.4 * 0.6], "indicator": [1.0, 0.0, 0.0],
            "difference": [0.35, 0.0, 0.0]}


def hand_made_run(folder, weighting, extra=()):
    """generated.csv (+ extra rows) and a complete cache written by hand: main() loads no model, it only merges.
    The members m1 and m2 are folders with a config.json only: 02 finds every member before it starts."""
    for member in ("org/m1", "m2"):
        os.makedirs(os.path.join(folder, "members", member))
        with open(os.path.join(folder, "members", member, "config.json"), "w") as fh:
            json.dump({"model_type": "llava"}, fh)
    generated = make_generated(folder, n=3, missing=(0, 1, 2))
    rows = disk.read_csv(generated)
    disk.write_csv(generated, rows + [{**rows[i], **change} for i, change in extra])
    for name, scores in CACHE.items():
        os.makedirs(os.path.join(folder, "weighted_cache", name))
        with open(os.path.join(folder, "weighted_cache", name, "rank0.jsonl"), "w") as fh:
            for row, (t, r) in zip(rows, scores):
                fh.write(json.dumps({"key": score_cache.row_key(row), "target": t, "real": r}) + "\n")
    return run(generated, [os.path.join(folder, "members", m) for m in ("org/m1", "m2")], weighting=weighting)


@pytest.mark.parametrize("name", sorted(WEIGHTINGS))
def test_every_weighting_on_a_hand_made_table(name, tmp_path):
    out = read(hand_made_run(str(tmp_path), name))
    assert [float(r["vqascore_target_m1"]) for r in out] == pytest.approx([0.7, 0.2, 0.5])
    assert [float(r["vqascore_real_m2"]) for r in out] == pytest.approx([0.2, 0.5, 0.3])
    assert [float(r["score_syn_target"]) for r in out] == pytest.approx(FT)
    assert [float(r["score_syn_real"]) for r in out] == pytest.approx(FR)
    got = [float(r["weight"]) for r in out]
    # a weighting a student adds has no hand-worked numbers: it must agree with itself row by row
    expected = EXPECTED.get(name) or [float(WEIGHTINGS[name](np.float64(t), np.float64(r))) for t, r in zip(FT, FR)]
    assert got == pytest.approx(expected)


def test_duplicate_and_empty_rows_are_named_and_not_weighted(tmp_path, capsys):
    """Issue 14 items 7 and 8: an exact duplicate and an empty neg_caption are named by line, not weighted.
    Issue 26: they are counted in the summary and in weighted.json, and listed in the skip file, once each."""
    out = read(hand_made_run(str(tmp_path), "difference", extra=[(0, {}), (1, {"neg_caption": " "})]))
    assert [float(r["weight"]) for r in out] == pytest.approx(EXPECTED["difference"])
    printed = capsys.readouterr().out
    assert "generated.csv: 1 row(s) skipped, exact duplicate of an earlier row: line(s) 5" in printed
    assert "generated.csv: 1 row(s) skipped, empty neg_caption: line(s) 6" in printed
    assert "3 rows weighted; 0 kept without a weight (their V^s could not be scored); 2 bad rows skipped; each " \
           f"listed with the reason in {tmp_path / 'weighted'}_skipped.csv" in printed
    assert [(r["line"], r["skip_reason"]) for r in read(str(tmp_path / "weighted_skipped.csv"))] == [
        ("5", "left out: exact duplicate of an earlier row"), ("6", "left out: empty neg_caption")]
    assert json.loads((tmp_path / "weighted.json").read_text())["bad_rows_skipped"] == 2


@pytest.mark.parametrize("name, phi, message", [
    ("log_ratio", lambda ft, fr: np.log(ft - fr), "phi = -1.05 for videos/0.mp4 (3 row(s))"),  # log(<1), log(<0)
    ("raw_difference", lambda ft, fr: ft - fr, "phi = -0.35 for videos/1.mp4 (1 row(s))")])  # Eq. 4 without max(0, .)
def test_a_weight_outside_0_1_stops_the_run(name, phi, message, tmp_path, monkeypatch):
    """A student's WEIGHTINGS entry that gives a phi outside [0, 1] (or nan) is named here, in 02, in
    one line: 03 refuses such a weight (issue 37), so 02 never writes one."""
    monkeypatch.setitem(WEIGHTINGS, name, phi)
    with np.errstate(all="ignore"), pytest.raises(common.UserError, match=re.escape(f"--weighting {name}: {message}")):
        hand_made_run(str(tmp_path), name)
    assert not (tmp_path / "weighted.csv").exists()


# ---- §4 Fig. 2 ----------------------------------------------------------------------------------
def test_fig2_png_and_table_of_means(tmp_path, capsys):
    hand_made_run(str(tmp_path), "difference")
    png = tmp_path / "weighted_fig2.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    summary = json.loads((tmp_path / "weighted.json").read_text())
    # rows 0, 1, 2 are object, flip, action: differences +0.35, -0.35, 0
    assert summary["fig2"]["object"]["mean"] == pytest.approx(0.35)
    assert summary["fig2"]["flip"]["mean"] == pytest.approx(-0.35)
    assert summary["fig2"]["action"] == {"n": 1, "mean": pytest.approx(0.0), "std": 0.0}
    printed = capsys.readouterr().out
    assert "flip" in printed and "-0.350" in printed and "-0.03" in printed  # ours, and the paper's


# ---- bad input -----------------------------------------------------------------------------------
def test_missing_and_undecodable_videos_are_skipped_and_counted(llava_dir, tmp_path):
    generated = make_generated(str(tmp_path), n=3, missing=(1,), corrupt=(2,))
    out = read(run(generated, [llava_dir]))
    # issue 25 item 7: the two rows stay, without a weight (they used to be dropped from weighted.csv)
    assert [(r["syn_video"], r["weight"] != "") for r in out] == [("videos/0.mp4", True), ("videos/1.mp4", False),
                                                                 ("videos/2.mp4", False)]
    skipped = read(str(tmp_path / "weighted_skipped.csv"))
    assert [r["syn_video"] for r in skipped] == ["videos/1.mp4", "videos/2.mp4"]
    assert "not found" in skipped[0]["skip_reason"] and "cannot decode" in skipped[1]["skip_reason"]
    assert json.loads((tmp_path / "weighted.json").read_text())["kept_without_weight"] == 2
    with pytest.raises(ValueError, match=r"generated.csv:3 \(videos/1.mp4\).*not found"):  # the file's line
        run(generated, [llava_dir], out_csv=str(tmp_path / "strict.csv"), strict=True)


def test_a_video_that_cannot_be_scored_keeps_its_real_triplet(llava_dir, tmp_path, capsys):
    """Issue 25 item 7: a row whose V^s is missing or undecodable stays in weighted.csv with empty score
    and weight cells, is listed in weighted_skipped.csv and counted once (the same number printed, in
    weighted.json and in the skip list); 03_train.py's loader then trains those triplets on L_real alone."""
    generated = make_generated(str(tmp_path), n=4, missing=(1,), corrupt=(3,))
    for i in range(4):  # the real videos V^r, which 03 needs
        video_io.write_video(str(tmp_path / "real" / f"{i}.mp4"), tiny.moving_square(8, 32, seed=10 + i))
    out = read(run(generated, [llava_dir]))
    assert [r["videopath"] for r in out] == [f"real/{i}.mp4" for i in range(4)]  # every row, in order
    columns = [c for c in out[0] if c.startswith(("vqascore_", "score_")) or c == "weight"]
    assert len(columns) == 5
    for i, r in enumerate(out):
        if i in (1, 3):  # missing, undecodable: every score cell and the weight empty
            assert all(r[c] == "" for c in columns), r
        else:
            assert all(0 <= float(r[c]) <= 1 for c in columns), r
    printed = capsys.readouterr().out
    assert f"wrote {tmp_path / 'weighted.csv'}: 2 rows weighted; 2 kept without a weight" in printed
    assert len(read(str(tmp_path / "weighted_skipped.csv"))) == 2
    summary = json.loads((tmp_path / "weighted.json").read_text())
    assert (summary["weighted"], summary["kept_without_weight"]) == (2, 2)
    assert sum(s["n"] for s in summary["fig2"].values()) == 2  # Fig. 2: the scored rows only
    # 03_train.py's loader: all four triplets train; rows 1 and 3 without their twin (L_real alone)
    spec = importlib.util.spec_from_file_location("train03", os.path.join(ROOT, "03_train.py"))
    train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train)
    kept, skipped = triplets.load_triplets(train.Args(train_csv=str(tmp_path / "weighted.csv"), video_root=str(tmp_path)))
    assert [t["syn"] is not None for t in kept] == [True, False, True, False]
    assert [(s["line"], s["reason"].split(":")[0]) for s in skipped] == [(3, "trained without a twin"),
                                                                         (5, "trained without a twin")]


# ---- §4 Fig. 2 over several runs (issue 25 item 6): the paper's pools three generators --------------
def scored_row(kind, target, real):
    """A weighted.csv row with what Fig. 2 reads: its type, fbar(V^s,t^s), fbar(V^s,t^r) (and a weight)."""
    return {"videopath": "v.mp4", "caption": f"t {kind} {target}", "neg_caption": "n", "misalignment": kind,
            "syn_video": "s.mp4", "score_syn_target": target, "score_syn_real": real,
            "weight": max(0.0, target - real) if isinstance(target, float) else ""}


def test_fig2_only_pools_several_runs_without_a_model(tmp_path, capsys, monkeypatch):
    a = hand_made_run(str(tmp_path / "a"), "difference")  # 02's own output: object +0.35, flip -0.35, action 0
    b, c = str(tmp_path / "b" / "weighted.csv"), str(tmp_path / "c" / "weighted.csv")
    disk.write_csv(b, [scored_row("flip", 0.2, 0.5), scored_row("object", 0.9, 0.1),
                         scored_row("hallucination", 0.3, 0.4)])
    disk.write_csv(c, [scored_row("flip", 0.6, 0.4), scored_row("action", "", "")])  # the second: no scores
    monkeypatch.setattr(score_cache, "load_member", lambda *a, **k: pytest.fail("--fig2_only loaded a model"))
    capsys.readouterr()
    out = weight.main(weight.Args(fig2_only=[a, b, c], out_csv=str(tmp_path / "all" / "weighted.csv")))
    assert out == str(tmp_path / "all" / "weighted.json")
    # the table by hand from the CSVs' score columns: every scored row of every file
    diffs = {}
    for path in (a, b, c):
        for r in read(path):
            if r["score_syn_target"]:
                difference = float(r["score_syn_target"]) - float(r["score_syn_real"])  # fbar(Vs,ts) - fbar(Vs,tr)
                diffs.setdefault(r["misalignment"], []).append(difference)
    summary = json.loads((tmp_path / "all" / "weighted.json").read_text())
    assert sorted(summary["fig2"]) == sorted(diffs) == ["action", "flip", "hallucination", "object"]
    for kind, d in diffs.items():
        assert summary["fig2"][kind] == {"n": len(d), "mean": pytest.approx(np.mean(d)),
                                         "std": pytest.approx(np.std(d))}
    assert summary["fig2"]["flip"]["mean"] == pytest.approx((-0.35 - 0.3 + 0.2) / 3)  # one row of each run
    assert summary["fig2"]["object"] == {"n": 2, "mean": pytest.approx((0.35 + 0.8) / 2), "std": pytest.approx(0.225)}
    assert summary["weighted"] == 7 and summary["files"][c] == {"rows": 2, "without_scores": 1}
    png = tmp_path / "all" / "weighted_fig2.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    printed = capsys.readouterr().out
    flip = next(line for line in printed.splitlines() if line.startswith("flip "))
    assert flip.split() == ["flip", "3", "-0.150", f"{np.std([-0.35, -0.3, 0.2]):.3f}", "-0.03"]  # ours, the paper's
    assert f"{c}: 2 rows, 1 without scores (left out of Fig. 2)" in printed
    assert "files" not in json.loads((tmp_path / "a" / "weighted.json").read_text())  # run a's own JSON untouched


def test_fig2_only_bad_input_names_the_file(tmp_path):
    good = str(tmp_path / "good.csv")
    disk.write_csv(good, [scored_row("flip", 0.2, 0.5)])
    generated = make_generated(str(tmp_path / "gen"), n=1)  # 01's CSV: no score columns
    with pytest.raises(ValueError, match=rf"{generated}: missing column\(s\) \['score_syn_target', 'score_syn_real'\]"):
        weight.main(weight.Args(fig2_only=[good, generated], out_csv=str(tmp_path / "all.csv")))
    bad = str(tmp_path / "bad.csv")
    disk.write_csv(bad, [scored_row("flip", 0.2, 0.5), scored_row("object", "n/a", 0.5)])
    with pytest.raises(ValueError, match=rf"{bad}:3: score_syn_target 'n/a', score_syn_real '0.5': not two numbers"):
        weight.main(weight.Args(fig2_only=[good, bad], out_csv=str(tmp_path / "all.csv")))
    with pytest.raises(ValueError, match="needs --out_csv"):
        weight.main(weight.Args(fig2_only=[good]))
    with pytest.raises(ValueError, match="is --fig2_only .a run's .json.*never replaces"):  # a run's own JSON
        weight.main(weight.Args(fig2_only=[good], out_csv=good))
    disk.write_csv(bad, [scored_row("flip", "", "")])
    with pytest.raises(ValueError, match="no row has scores"):
        weight.main(weight.Args(fig2_only=[bad], out_csv=str(tmp_path / "all.csv")))


def test_fig2_only_from_the_command_line(tmp_path):
    runs = []
    for k in range(3):  # one weighted.csv per generator
        runs.append(str(tmp_path / f"gen{k}" / "weighted.csv"))
        disk.write_csv(runs[-1], [scored_row("flip", 0.1 * k, 0.5), scored_row("object", 0.9, 0.1 * k)])
    proc = tiny.run_main("02_weight.py", "--fig2_only", *runs, "--out_csv", tmp_path / "all" / "weighted.csv")
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "all" / "weighted.json").read_text())
    assert summary["fig2"]["flip"] == {"n": 3, "mean": pytest.approx(0.1 - 0.5),
                                       "std": pytest.approx(np.std([0, .1, .2]))}
    assert (tmp_path / "all" / "weighted_fig2.png").exists() and not (tmp_path / "all" / "weighted.csv").exists()


# ---- issue 37: no output is an input, however named; each run once; an older weighted.csv as input ----
def test_out_csv_naming_generated_csv_is_refused_before_any_work(llava_dir, tmp_path):
    """Issue 37 item 1: --out_csv naming --generated_csv (here as ./generated.csv) replaced 01's CSV and then
    refused its own rerun (a cache made from another CSV). Now one line, nothing written, the same on a rerun."""
    generated = make_generated(str(tmp_path), n=1)
    before = open(generated, "rb").read()
    for _ in range(2):
        done = tiny.run_main("02_weight.py", "--generated_csv", generated, "--models", llava_dir,
                             "--out_csv", "./generated.csv", cwd=tmp_path)
        tiny.assert_user_error(done, f"--out_csv ./generated.csv is --generated_csv {generated}", "pass another --out_csv")
    assert open(generated, "rb").read() == before and not (tmp_path / "generated_cache").exists()


def test_fig2_only_never_writes_over_a_runs_own_json_through_a_symlink(tmp_path):
    """Issue 37 item 1: the pooled weighted.json went over run a's own when --out_csv's folder, or the
    --fig2_only file, was a symlink (the guard compared abspath, not the real path)."""
    run_a = tmp_path / "a"
    disk.write_csv(str(run_a / "weighted.csv"), [scored_row("flip", 0.2, 0.5)])
    (run_a / "weighted.json").write_text('{"run": "a"}')
    os.symlink(run_a, tmp_path / "link")  # the run's folder
    os.symlink(run_a / "weighted.csv", tmp_path / "link.csv")  # the run's CSV
    for given, out in ((run_a / "weighted.csv", tmp_path / "link" / "weighted.csv"),
                       (tmp_path / "link.csv", run_a / "weighted.csv")):
        done = tiny.run_main("02_weight.py", "--fig2_only", given, "--out_csv", out)
        tiny.assert_user_error(done, f"--out_csv (.json) {os.path.splitext(out)[0]}.json is --fig2_only (a run's .json)")
    assert (run_a / "weighted.json").read_text() == '{"run": "a"}' and not (run_a / "weighted_fig2.png").exists()


def test_fig2_only_refuses_the_same_run_twice(tmp_path):
    """Issue 37 item 2: the same weighted.csv given twice counted each of its rows twice in Fig. 2."""
    disk.write_csv(str(tmp_path / "a" / "weighted.csv"), [scored_row("flip", 0.2, 0.5)])
    os.symlink(tmp_path / "a" / "weighted.csv", tmp_path / "link.csv")
    for twice in (["a/weighted.csv", "./a/weighted.csv"], ["a/weighted.csv", "link.csv"]):
        done = tiny.run_main("02_weight.py", "--fig2_only", *twice, "--out_csv", "all/weighted.csv", cwd=tmp_path)
        tiny.assert_user_error(done, f"--fig2_only {twice[0]} and {twice[1]} are the same file", "count twice")
    assert not (tmp_path / "all").exists()


def test_an_older_weighted_csv_is_weighed_afresh(llava_dir, tmp_path):
    """Issue 37 item 3: 02 on its own older weighted.csv (another --weighting), one V^s now undecodable: its
    stale scores made the row look scored (a traceback on the weighting). 02's columns are dropped, so
    every row is as a fresh run on generated.csv gives it: the bad row without a weight, once per column."""
    generated = make_generated(str(tmp_path), n=3)
    older = run(generated, [llava_dir])  # weighted.csv: every row scored, by the default weighting
    (tmp_path / "videos" / "1.mp4").write_bytes(b"not an mp4 any more")
    fresh = read(run(generated, [llava_dir], out_csv=str(tmp_path / "fresh.csv"), weighting="difference"))
    done = tiny.run_main("02_weight.py", "--generated_csv", older, "--models", llava_dir,
                         "--out_csv", tmp_path / "again.csv", "--weighting", "difference")
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"{older}: already has 02's output columns" in done.stdout
    again = read(str(tmp_path / "again.csv"))
    assert list(again[0]) == list(fresh[0]) and again == fresh  # every cell, the scored rows' numbers too
    assert again[1]["weight"] == again[1]["score_syn_target"] == "" and again[0]["weight"] != ""


# ---- resume and torchrun ----------------------------------------------------------------------------
def assert_same_csv(a, b):
    ra, rb = read(a), read(b)
    assert [list(r) for r in ra] == [list(r) for r in rb] and len(ra) == len(rb) > 0
    for x, y in zip(ra, rb):
        for k in x:
            if k.startswith(("vqascore_", "score_", "weight")):
                assert float(x[k]) == pytest.approx(float(y[k]), rel=1e-5), k
            else:
                assert x[k] == y[k], k


def test_resume_and_two_ranks_give_the_same_csv(llava_dir, instructblip_dir, tmp_path, capsys):
    generated = make_generated(str(tmp_path), n=2)  # one video per rank below
    models = [llava_dir, instructblip_dir]
    one = run(generated, models)
    reference = open(one).read()

    # a run killed while writing llava's last video: drop that record, leave half a line behind
    part = tmp_path / "weighted_cache" / os.path.basename(llava_dir) / "rank0.jsonl"
    lines = part.read_text().splitlines(keepends=True)
    part.write_text("".join(lines[:-1]) + lines[-1][:25])
    os.remove(one)
    capsys.readouterr()
    assert open(run(generated, models)).read() == reference
    assert "to score per model: " + f"{os.path.basename(llava_dir)} 1, {os.path.basename(instructblip_dir)} 0" \
        in capsys.readouterr().out  # only the lost video was scored again, and instructblip never loaded
    # the torn line was cut off before the file grew (parts.appending): the lost video's record follows the whole ones
    now = part.read_text().splitlines(keepends=True)
    assert now[:-1] == lines[:-1] and len(now) == len(lines) and json.loads(now[-1])["key"] == json.loads(lines[-1])["key"]
    # settings-checked resume (issue 14 item 5): a cache of 4 frames / first_token is not reused for others
    for change in ("num_frames: 4 then, 2 now", "vqascore: 'first_token' then, 't2v_metrics' now"):
        key, value = change.split(": ")[0], 2 if change.startswith("num") else "t2v_metrics"
        with pytest.raises(ValueError, match=rf"weighted_cache/{os.path.basename(llava_dir)}.json: the work here was "
                                             rf"made with other settings \({change}\)"):
            run(generated, models, **{key: value})

    # issue 36: two torchrun "nodes" (README's local two-node command), the cache on the folder they share
    two = str(tmp_path / "two" / "weighted.csv")
    assert_ran(torchrun_nodes(os.path.join(ROOT, "02_weight.py"), "--generated_csv", generated, "--out_csv", two,
                              "--models", *models, timeout=600))
    parts = os.listdir(os.path.join(tmp_path, "two", "weighted_cache", os.path.basename(llava_dir)))
    assert sorted(parts) == ["rank0.jsonl", "rank1.jsonl"]  # both ranks did work, each in its global rank's file
    assert_same_csv(one, two)


# ---- issue 26: found in seconds, nothing written for a run that cannot start, long captions, full disks ----
def test_every_member_is_found_before_any_is_loaded_or_any_video_read(llava_dir, clip_flant5_dir, tmp_path, monkeypatch):
    """A member that is not there (the second, or CLIP-FlanT5's vision tower) stops the run before the
    first member loads or a video is read, and before anything is written."""
    generated = make_generated(str(tmp_path), n=1)
    monkeypatch.setattr(score_cache, "load_member", lambda *a, **k: pytest.fail("a member was loaded"))
    monkeypatch.setattr(score_cache, "read_video", lambda *a, **k: pytest.fail("a video was read"))
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(common.UserError, match=rf"--models {tmp_path}/no-such-member: no such folder"):
        run(generated, [llava_dir, str(tmp_path / "no-such-member")])
    towerless = shutil.copytree(clip_flant5_dir, tmp_path / "clip-flant5-elsewhere")
    config = json.loads((towerless / "config.json").read_text())
    config["mm_vision_tower"] = str(tmp_path / "no-such-tower")
    (towerless / "config.json").write_text(json.dumps(config))
    with pytest.raises(common.UserError, match=rf"--models {towerless}: its mm_vision_tower {tmp_path}/no-such-tower"):
        run(generated, [llava_dir, str(towerless)])
    # issue 32: every member that is not there, named in one error (not one rerun per member)
    with pytest.raises(common.UserError, match=rf"--models {tmp_path}/gone-1: no such folder.*; --models "
                                               rf"{towerless}: its mm_vision_tower .*; --models {tmp_path}/gone-2: no such"):
        run(generated, [str(tmp_path / "gone-1"), llava_dir, str(towerless), str(tmp_path / "gone-2")])
    # issue 37: the flags' numbers are runs.check_numbers' (its Args.POSITIVE), from the command line
    done = tiny.run_main("02_weight.py", "--generated_csv", generated, "--models", llava_dir, "--num_frames", "0")
    tiny.assert_user_error(done, "--num_frames 0: give a number >= 1")
    assert sorted(os.listdir(tmp_path)) == sorted(before + ["clip-flant5-elsewhere"])  # no cache, no settings record


def test_a_run_that_weighed_nothing_stops_and_its_corrected_rerun_runs(llava_dir, tmp_path):
    """Every V^s unreadable (here: generated.csv moved away from its videos): exit 2 naming the cause and
    an example path; no weighted.csv, and no settings record that would refuse the corrected rerun."""
    make_generated(str(tmp_path), n=2)
    moved = tmp_path / "elsewhere" / "generated.csv"
    moved.parent.mkdir()
    shutil.move(str(tmp_path / "generated.csv"), moved)
    with pytest.raises(common.UserError, match=rf"{moved}: none of its 2 rows could be weighed, e.g. {moved}:2 "
                                               rf"\(videos/0.mp4\): .*{moved.parent}/videos/0.mp4: video file not found"):
        run(str(moved), [llava_dir])
    assert sorted(os.listdir(moved.parent)) == ["generated.csv", "weighted_cache"]
    assert os.listdir(moved.parent / "weighted_cache") == ["finished.rank0"]  # no member's record or errors
    rows = disk.read_csv(str(moved))  # the fix: syn_video made to point at the videos
    disk.write_csv(str(moved), [{**r, "syn_video": "../" + r["syn_video"]} for r in rows])
    assert all(r["weight"] != "" for r in read(run(str(moved), [llava_dir])))


def test_a_caption_past_a_members_context_is_left_unscored_named_and_counted(
        llava_dir, instructblip_dir, clip_flant5_dir, frames, tmp_path, capsys, monkeypatch):
    """A t^s longer than a member takes (LLaVA: its LLM's 1,024 positions; InstructBLIP: its Q-Former's
    512; CLIP-FlanT5: Flan-T5's 512 text tokens) is not scored (LLaVA would score it silently wrong,
    InstructBLIP stop the run): the row is kept without a weight like an undecodable V^s, named by
    file:line by each member, and counted once. The skip lines go above the progress bar (tqdm.write)."""
    long = "a red square moves to the right and then " * 150
    models = [llava_dir, instructblip_dir, clip_flant5_dir]
    for member in models:
        model, processor = clip_t5.load_member(member)
        assert vqa.past_context(model, processor, frames[0], {"neg_caption": NEG, "caption": CAPTION}) is None
        message = vqa.past_context(model, processor, frames[0], {"neg_caption": long, "caption": CAPTION})
        assert message.startswith("its neg_caption makes a prompt of ") and message.endswith(": not scored"), message
    generated = make_generated(str(tmp_path), n=2)
    rows = disk.read_csv(generated)
    rows[1]["neg_caption"] = long
    disk.write_csv(generated, rows)
    written = []
    monkeypatch.setattr(score_cache.tqdm, "write", lambda line, *a, **k: written.append(line))
    out = read(run(generated, models))
    assert [r["weight"] != "" for r in out] == [True, False]
    for member, limit in zip(models, ["1024 positions", "512 Q-Former positions", "512 text tokens"]):
        name = os.path.basename(member)
        line = next(w for w in written if f"model {name}:" in w)  # one line a member
        assert line.startswith(f"[rank 0] skipping {generated}:3 (videos/1.mp4), model {name}: its neg_caption")
        n, what = limit.split(" ", 1)
        assert re.search(rf"makes a prompt of \d+ {what}, past the model's {n}: not scored$", line), line
    skipped = read(str(tmp_path / "weighted_skipped.csv"))
    assert [r["line"] for r in skipped] == ["3"] and skipped[0]["skip_reason"].count("not scored") == 3
    assert json.loads((tmp_path / "weighted.json").read_text())["kept_without_weight"] == 1
    assert "1 rows weighted; 1 kept without a weight" in capsys.readouterr().out


def test_a_full_disk_names_the_cache_file_and_the_figure(llava_dir, tmp_path, monkeypatch):
    import errno
    import matplotlib.figure

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")
    with monkeypatch.context() as patch:
        patch.setattr(matplotlib.figure.Figure, "savefig", full)
        with pytest.raises(common.UserError, match=rf"{tmp_path}/a/weighted_fig2.png: cannot write it: No space left"):
            hand_made_run(str(tmp_path / "a"), "difference")

    class FullDisk(io.StringIO):
        write = full
    monkeypatch.setattr(parts, "open", lambda *a, **k: FullDisk(), raising=False)  # parts.appending's file
    generated = make_generated(str(tmp_path / "b"), n=1)
    part = tmp_path / "b" / "weighted_cache" / os.path.basename(llava_dir) / "rank0.jsonl"
    with pytest.raises(common.UserError, match=rf"{part}: cannot write it: No space left on device"):
        run(generated, [llava_dir])
