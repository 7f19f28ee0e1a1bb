r"""02_weight.py: the VQAScore ensemble fbar and the weight phi of every synthetic video.

Implements §4 (Fig. 2) and §5 Eq. (4) / Table 4 of Zanella et al., CVPR 2025: a synthetic video V^s (made from
t^s) is weighed by how much better it shows t^s than t^r: w = phi = max(0, fbar(V^s,t^s) - fbar(V^s,t^r)), Eq. (4).
fbar(V, t) = the mean over 3 image VQA models of their VQAScore (Lin et al. 2024), P("Yes" | frame,
'Does this figure show "<t>"? Please answer yes or no.'), averaged over 4 uniformly sampled frames of V.
By default phi is Table 4's row 3, fbar(V^s,t^s) (1 - fbar(V^s,t^r)), which §6.2 used for Video-LLaVA
(--weighting difference: Eq. 4, used for mPLUG-Owl). The authors never released this stage.

Reads   <dir>/generated.csv        01_generate.py's: input columns + syn_video (relative to <dir>) + seed
Writes  <dir>/weighted.csv         the same + vqascore_{target,real}_<member>, score_syn_target = fbar(V^s,t^s),
                                   score_syn_real = fbar(V^s,t^r), weight (all empty if V^s could not be scored)
        <dir>/weighted_fig2.png    Fig. 2 (--fig2_only: over several runs' weighted.csv); <dir>/weighted.json
        <dir>/weighted_gallery.html  V^s beside V^r, captions, fbar and phi, per type (opens from disk)
        <dir>/weighted_skipped.csv the rows kept without a weight or left out as bad: line, why (if any)
        <dir>/weighted_cache/      per-frame scores per member and rank: a killed or repeated run resumes

Launch (one GPU holds one model at a time; more GPUs split the videos; a CPU-sized run: README):
    python 02_weight.py --generated_csv runs/generate/generated.csv --video_root data/videos
    torchrun --standalone --nproc_per_node 4 02_weight.py --generated_csv runs/generate/generated.csv
"""
import contextlib
import gc
import glob
import html
import io
import json
import os
import re
import shutil
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Literal

import numpy as np
import torch

from tqdm import tqdm

from common import WEIGHTINGS, UserError, answer_token_ids, hidden_word_spans
from synvita.disk import atomic_path, check_resume, file_hash, keep_split, naming_write_errors, read_csv, save_json, write_csv
from synvita.runs import print0, progress, run_stage, setup_distributed, shard, wait_for_files
from synvita.video_io import read_video
from synvita.video_llm import load_video_llm, max_positions, resolve_model

VQA_QUESTION = 'Does this figure show "{caption}"? Please answer yes or no.'  # VQAScore's question
SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
          "The assistant gives helpful, detailed, and polite answers to the user's questions.")
# Prompts, answers and padding to a square follow t2v_metrics (VQAScore's code).
# (prompt, answer) of the families without a chat template, as t2v_metrics asks them (InstructBLIP
# answers "yes", CLIP-FlanT5 is asked in its "t5_chat" style). Every other family uses its processor's
# chat template; decoder-only models answer "Yes" (common.answer_token_ids), as t2v_metrics' LLaVA-1.5.
VQA_FORMATS = {
    "instructblip": ("Question: {question}", "yes"),
    "clip_t5": (SYSTEM + " USER: <image>\n{question} ASSISTANT: ", "Yes"),
    "blip-2": ("Question: {question} Answer:", "yes"),  # BLIP-2's VQA prompt
}
PAD_TO_SQUARE = ("clip_t5", "llava")  # t2v_metrics' image_aspect_ratio "pad"
# §4's ensemble. The paper names the models, not their sizes: these are the sizes t2v_metrics uses by
# default; ~25 GB each in bfloat16, loaded one at a time. CLIP-FlanT5 has no transformers class: it is
# rebuilt from transformers' parts (clip_t5_classes, in the plumbing at the end).
PAPER_ENSEMBLE = [
    "Salesforce/instructblip-flan-t5-xxl",  # InstructBLIP-FlanT5 (Dai et al. 2023)
    "zhiqiulin/clip-flant5-xxl",  # CLIP-FlanT5 (Lin et al. 2024, VQAScore's own model)
    "llava-hf/llava-1.5-13b-hf",  # LLaVA-1.5 (Liu et al. 2024)
]
# Fig. 2's mean of fbar(V^s,t^s) - fbar(V^s,t^r) per misalignment type, printed beside ours
PAPER_FIG2_MEANS = {"flip": -0.03, "hallucination": -0.05, "action": 0.09, "attribute": 0.15, "object": 0.15}
REQUIRED = ("videopath", "caption", "neg_caption", "misalignment", "syn_video")  # generated.csv's columns read here


@dataclass
class Args:
    generated_csv: str = ""
    """01_generate.py's CSV: input columns + syn_video (relative to this CSV's folder) + seed"""
    out_csv: str = ""
    """output CSV; default: weighted.csv next to --generated_csv (figure, JSON and cache beside it)"""
    models: list = field(default_factory=lambda: list(PAPER_ENSEMBLE))
    """the VQA ensemble of fbar in Eq. (4): hub ids or local folders of transformers image-text models
    or of CLIP-FlanT5 checkpoints (BLIP-2, e.g. Salesforce/blip2-flan-t5-xl, works too)"""
    num_frames: int = 4
    """frames of V^s sampled uniformly; fbar averages the VQAScore over them"""
    vqascore: Literal["first_token", "t2v_metrics"] = "first_token"
    """first_token: P(first answer token), VQAScore as its paper writes it; t2v_metrics:
    exp(-mean cross-entropy) over the answer's tokens + end token, as VQAScore's code computes it"""
    weighting: Literal[tuple(WEIGHTINGS)] = "target_x_inv_real"
    """phi, a key of common.WEIGHTINGS (Table 4): "target_x_inv_real" = row 3, fbar(Vs,ts) (1 - fbar(Vs,tr)),
    which §6.2 used for Video-LLaVA, the default model; "difference" = Eq. (4), used for mPLUG-Owl"""
    split: str = "train"
    """weigh only rows of this `split` when the CSV has that column ("" = all rows)"""
    pairs_per_forward: int = 8
    """(frame, caption) pairs per forward pass: 8 = a video's 4 frames x 2 captions at once; a frame's two
    captions share its encoding, so they always go together (1 acts as 2: one frame a call)"""
    strict: bool = False
    """stop at the first row that cannot be scored, instead of keeping it without a weight and counting it"""
    video_root: str = ""
    """where the real videos V^r are (the CSV's videopath below it): only the gallery reads them"""
    gallery: bool = True
    """write <out stem>_gallery.html: per misalignment type, the V^s with the highest, middle and lowest phi"""
    gallery_per_type: int = 3
    """the gallery's V^s per type and section (highest phi, middle, lowest phi)"""
    fig2_only: list = field(default_factory=list)
    """Fig. 2 alone, no model loaded: the weighted.csv of several runs (e.g. one per generator: the paper's
    Fig. 2 pools three), each row with its own run's scores; needs --out_csv, writes <its stem>_fig2.png, .json"""


# ---- §4: VQAScore (Lin et al. 2024) of (image, caption) pairs --------------------------------------
#     VQAScore(image, t) = P("Yes" | image, 'Does this figure show "<t>"? Please answer yes or no.')
def vqa_prompt(processor, model_type, caption):
    """The VQAScore question in the model's own prompt format -> (prompt, answer word)."""
    question = VQA_QUESTION.format(caption=caption)
    if model_type in VQA_FORMATS:
        form, answer = VQA_FORMATS[model_type]
        return form.format(question=question), answer
    # NOTE (deviation): LLaVA gets its hub chat template (no system sentence).
    if getattr(processor, "chat_template", None):
        conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        return processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False), "Yes"
    raise UserError(f"model type {model_type!r}: its processor has no chat template; add its prompt to VQA_FORMATS")


def answer_ids(tokenizer, prompt, answer, encoder_decoder, vqascore):
    """The answer tokens a_1..a_k that VQAScore reads: first_token, the answer's first token (k = 1);
    t2v_metrics, its tokens and the end token. Encoder-decoder: the answer tokenised alone ("▁yes",
    T5's decoder starts afresh); decoder-only: the token after the prompt (common.answer_token_ids,
    "▁Yes" after LLaVA's "ASSISTANT:", where "Yes" is one token)."""
    # NOTE (deviation): --vqascore first_token (default) is P("Yes"), VQAScore as its paper defines it;
    # t2v_metrics' code takes exp(-mean cross-entropy) over "Yes" + the end token (--vqascore t2v_metrics).
    ids = tokenizer(answer, add_special_tokens=False)["input_ids"] if encoder_decoder else \
        answer_token_ids(tokenizer, prompt)[:1]
    return ids[:1] if vqascore == "first_token" else ids + [tokenizer.eos_token_id]


def pad_to_square(frame, colour):
    """t2v_metrics' expand2square: the frame centred on a square of `colour` (its side = the long side)."""
    (h, w), side = frame.shape[:2], max(frame.shape[:2])
    out = np.full((side, side, 3), colour, dtype=frame.dtype)  # (side, side, 3)
    out[(side - h) // 2:(side - h) // 2 + h, (side - w) // 2:(side - w) // 2 + w] = frame
    return out


def vqa_setup(model, processor, images, captions, vqascore):
    """What every VQAScore forward of this member needs, checked once: (images, padded to a square where
    t2v_metrics pads them; each caption's prompt; the answer ids a_1..a_k, a tensor (k,) on the model's device)."""
    if vqascore not in ("first_token", "t2v_metrics"):
        raise ValueError(f"--vqascore {vqascore!r}: use first_token or t2v_metrics")
    enc_dec, model_type = model.config.get_text_config().is_encoder_decoder, model.config.model_type  # T5: enc_dec
    prompts = [vqa_prompt(processor, model_type, caption) for caption in captions]  # [(prompt, answer word)]
    # every prompt has the same answer word, so one list of answer ids a_1..a_k serves all: (k,)
    answer = torch.tensor(answer_ids(processor.tokenizer, *prompts[0], enc_dec, vqascore), device=model.device)
    # BLIP-2 / InstructBLIP: each prompt needs num_query_tokens image tokens (the Q-Former's outputs go
    # there); a processor saved without the number puts none (BLIP-2: transformers silently scores the
    # text alone) or fails obscurely (InstructBLIP)
    queries, theirs = getattr(model.config, "num_query_tokens", None), getattr(processor, "num_query_tokens", None)
    if queries and theirs != queries:
        raise UserError(f"{model_type}: processor's num_query_tokens {theirs}, the model's {queries}: "
                        "set it in processor_config.json")
    # NOTE (deviation): InstructBLIP's hub processor squashes a frame to 224x224, where t2v_metrics
    # resizes its short side and crops the centre; CLIP-FlanT5 and LLaVA pad to a square as t2v_metrics.
    if model_type in PAD_TO_SQUARE:
        colour = [int(255 * m) for m in processor.image_processor.image_mean]  # t2v_metrics' int(x * 255)
        images = [pad_to_square(image, colour) for image in images]
    return images, [p for p, _ in prompts], answer


def vqa_inputs(model, processor, images, prompts, padding_side=None):
    """The processor's batch of (images[i], prompts[i]) pairs on the model's device, its image tokens checked.
    padding_side: None (the tokenizer's: right for T5), "left" or "right"."""
    pad = {} if padding_side is None else {"padding_side": padding_side}
    inputs = processor(images=list(images), text=list(prompts), padding=True, return_tensors="pt", **pad)
    inputs = inputs.to(model.device, model.dtype)  # floats (pixels) to the model's dtype, ids stay ints
    queries = getattr(model.config, "num_query_tokens", None)  # BLIP-2 / InstructBLIP's image tokens a prompt holds
    if queries and ((inputs["input_ids"] == model.config.image_token_id).sum(1) != queries).any():
        raise UserError(f"{model.config.model_type}: the prompts do not hold {queries} image tokens "
                        f"(id {model.config.image_token_id}) each: the tokenizer's <image> is another id")
    return inputs


def answer_logits(model, inputs, answer, **image):
    """The logits (n, k, vocab) that predict a_1..a_k after each prompt of `inputs` (decoder-only: left-padded).
    image: the images' encoding given instead of inputs' pixel_values (frame_scores), as transformers'
    mm_encoder_outputs."""
    n, k = len(inputs["input_ids"]), len(answer)  # n pairs in this forward, k answer tokens
    given = answer[:-1].expand(n, k - 1)  # a_1..a_{k-1}, the model's input while it predicts a_2..a_k
    if model.config.get_text_config().is_encoder_decoder:  # the decoder reads its start token, then a_1..a_{k-1}
        start = torch.full((n, 1), model.config.get_text_config().decoder_start_token_id, device=model.device)
        return model(**{**inputs, **image}, decoder_input_ids=torch.cat([start, given], 1)).logits  # (n, k, vocab)
    # the prompt, then a_1..a_{k-1}; lm_head runs on the last k positions only.
    # Left padding shifts a short prompt's positions, which rotary embeddings (relative) ignore.
    ids = torch.cat([inputs["input_ids"], given], 1)
    mask = torch.cat([inputs["attention_mask"], torch.ones_like(given)], 1)
    return model(**{**inputs, **image, "input_ids": ids, "attention_mask": mask}, logits_to_keep=k).logits


def vqascore_of(logits, answer):
    """exp(mean_j log P(a_j)) (n,) on the CPU, each P(a_j) from the FULL softmax over the vocabulary of
    logits (n, k, vocab), not Eq. 1's Yes/No ratio; first_token (k = 1): P("Yes")."""
    n, k = logits.shape[:2]
    log_p = logits.float().log_softmax(-1).gather(2, answer.expand(n, k)[..., None])[..., 0]  # (n, k) log P(a_j)
    return log_p.mean(1).exp().cpu()  # (n,) exp of the mean over the k answer tokens


@torch.no_grad()
def vqa_scores(model, processor, images, captions, pairs_per_forward=8, vqascore="first_token"):
    """VQAScore of each (image, caption) pair, the definition: each pair a full forward, its image encoded
    again (as t2v_metrics does; score_video shares each frame's encoding instead, frame_scores): exp(mean_j
    log P(a_j | image, question, a_<j)) over the answer tokens a_1..a_k of answer_ids; first_token: P("Yes").

    images: list of n uint8 arrays (H, W, 3); captions: list of n texts. Pairs go through the model
    `pairs_per_forward` at a time. Returns a float tensor (n,) on the CPU."""
    images, prompts, answer = vqa_setup(model, processor, images, captions, vqascore)
    # decoder-only: left padding puts every prompt's end, where the answer starts, at the same place
    side = None if model.config.get_text_config().is_encoder_decoder else "left"
    scores = []
    for s in range(0, len(captions), pairs_per_forward):
        inputs = vqa_inputs(model, processor, images[s:s + pairs_per_forward], prompts[s:s + pairs_per_forward], side)
        scores.append(vqascore_of(answer_logits(model, inputs, answer), answer))  # (n,)
    return torch.cat(scores)


# ---- §4: each frame encoded once, for all of its captions (t^s and t^r) ---------------------------
# VQAScore(frame, t) for t = t^s, t^r: the image side reads no caption, so it runs once per frame and
# both captions read its output, in one call; the scores are vqa_scores' (tests/test_weight.py, 1e-5).
@torch.no_grad()
def frame_scores(model, processor, frames, captions, frames_per_forward=4, vqascore="first_token"):
    """VQAScore of every frame against every caption, (C captions, T frames), as vqa_scores gives it for
    each pair, each frame's encoding computed once and shared by its C captions (SHARED_ENCODING; a
    member of another family is scored pair by pair). frames: T uint8 arrays (H, W, 3)."""
    C, T = len(captions), len(frames)
    shared = SHARED_ENCODING.get(model.config.model_type)
    if shared is None:  # no shared path for this family: vqa_scores on each (frame, caption) pair
        pairs = vqa_scores(model, processor, [f for _ in captions for f in frames], [c for c in captions for _ in frames],
                           frames_per_forward * C, vqascore)
        return pairs.view(C, T)
    frames, prompts, answer = vqa_setup(model, processor, frames, captions, vqascore)
    scores = []
    for s in range(0, T, frames_per_forward):
        chunk = frames[s:s + frames_per_forward]  # m frames, each with its C captions in this call
        # the pairs frame by frame: (frame i, caption c) is row i*C + c, a frame's C rows side by side
        # llava_logits splits each prompt after its image: right padding; else as vqa_scores pads
        side = "right" if shared is llava_logits else None if model.config.get_text_config().is_encoder_decoder else "left"
        inputs = vqa_inputs(model, processor, [f for f in chunk for _ in captions], prompts * len(chunk), side)
        scores.append(vqascore_of(shared(model, inputs, answer, C), answer).view(len(chunk), C))  # (m, C)
    return torch.cat(scores).T  # (C, T)


def given_image(features):
    """The images' encoding (n, tokens, d) as transformers' mm_encoder_outputs, in place of pixel_values:
    the forward then skips its image side (and CLIPFlanT5 below does the same)."""
    encoded = SimpleNamespace(pooler_output=features, qformer_outputs=None, vision_outputs=None)
    return {"pixel_values": None, "mm_encoder_outputs": {"image": encoded}}


def image_once_logits(model, inputs, answer, C):
    """BLIP-2, CLIP-FlanT5: the whole image side reads no text (BLIP-2's Q-Former its queries only;
    CLIP-FlanT5's CLIP tower + projector): it runs on each frame once, rows 0, C, 2C.. of the pairs, and
    each frame's encoding goes to its C pairs. -> answer_logits (n, k, vocab)."""
    features = model.get_image_features(inputs["pixel_values"][::C]).pooler_output  # (m, image tokens, d)
    return answer_logits(model, inputs, answer, **given_image(features.repeat_interleave(C, 0)))  # (n, ...)


def instructblip_logits(model, inputs, answer, C):
    """InstructBLIP: its Q-Former reads the question too, so only the vision tower (ViT-g, ~1B parameters,
    ~40 % of a pair's FLOPs) runs once per frame; the Q-Former, the projection and T5 run per pair, as in
    transformers' InstructBlipForConditionalGeneration.get_image_features (its steps 2 and 3, below)."""
    vision = model.vision_model(pixel_values=inputs["pixel_values"][::C])[0]  # (m, 1 + patches, d_vision)
    vision = vision.repeat_interleave(C, 0)  # (n, 1 + patches, d_vision): each frame's, for its C pairs
    query = model.query_tokens.expand(len(vision), -1, -1)  # (n, queries, d_q), the learnt queries
    seen = inputs["qformer_attention_mask"]  # (n, question tokens): 0 at padding
    # the queries and the question's tokens together (every query seen), cross-attending to all the patches
    q = model.qformer(input_ids=inputs["qformer_input_ids"], query_embeds=query, encoder_hidden_states=vision,
                      attention_mask=torch.cat([torch.ones_like(seen[:, :1]).expand(-1, query.shape[1]), seen], 1),
                      encoder_attention_mask=torch.ones_like(vision[..., 0], dtype=torch.long),
                      return_dict=True)[0][:, :query.shape[1]]  # (n, queries, d_q)
    return answer_logits(model, inputs, answer, **given_image(model.language_projection(q)))  # (n, k, vocab)


def llava_logits(model, inputs, answer, C):
    """LLaVA-1.5 (decoder-only): each prompt is [BOS "USER:" <the image's tokens> | the question
    "ASSISTANT:"]; the part up to the image's last token (the prefix, ~580 of ~605 positions) is the same
    for a frame's C captions. It runs once per frame (vision tower, projector and the LLM, its KV kept);
    each caption's suffix and a_1..a_{k-1} then run on a copy of that KV. inputs: right-padded."""
    ids, mask, k = inputs["input_ids"], inputs["attention_mask"], len(answer)  # (n, L), n = m frames x C
    P = int((ids[0] == model.config.image_token_id).nonzero().max()) + 1  # the prefix: through the image
    if not ((ids[:, :P] == ids[:1, :P]).all() and mask[:, :P].all()):
        raise ValueError(f"{model.config.model_type}: the prompts do not share their start up to the image")
    prefix = model.model(input_ids=ids[::C, :P], pixel_values=inputs["pixel_values"][::C], use_cache=True)
    cache = prefix.past_key_values  # DynamicCache: (m, heads, P, d) keys and values per layer
    cache.batch_repeat_interleave(C)  # copied: each frame's, for its C pairs (the suffixes append to them)
    # each pair's suffix then a_1..a_{k-1}, right-padded: its positions go on from P, as in the full prompt
    lengths = mask.sum(1) - P  # (n,) the suffix's real tokens
    tails = [torch.cat([row[P:P + s], answer[:-1]]) for row, s in zip(ids, lengths.tolist())]
    suffix = torch.nn.utils.rnn.pad_sequence(tails, batch_first=True)  # (n, S): pads (0) after every real token
    real = torch.arange(suffix.shape[1], device=ids.device) < (lengths + k - 1)[:, None]  # (n, S)
    hidden = model.model(input_ids=suffix, attention_mask=torch.cat([mask[:, :P], real.long()], 1),
                         past_key_values=cache).last_hidden_state  # (n, S, d)
    # the positions that predict a_1..a_k: the suffix's last token, then a_1..a_{k-1}; lm_head there only
    at = (lengths[:, None] - 1 + torch.arange(k, device=ids.device))[..., None].expand(-1, -1, hidden.shape[-1])
    return model.lm_head(hidden.gather(1, at))  # (n, k, vocab)


# model_type -> how its frames are encoded once (each function: (model, inputs, answer, C) -> logits)
SHARED_ENCODING = {"instructblip": instructblip_logits, "blip-2": image_once_logits, "clip_t5": image_once_logits,
                   "llava": llava_logits}


def past_context(model, processor, frame, captions, vqascore="first_token"):
    """Which of `captions` ({column: text}) makes a VQAScore prompt longer than the member takes, as a
    message naming the column, its length and the limit; None if every prompt fits.

    Decoder-only (LLaVA): every position, the image's tokens and the answer tokens fed back included,
    against the LLM's max_position_embeddings (video_llm.max_positions), where a longer prompt would still
    run, silently wrong. Encoder-decoder (T5: relative positions): the prompt's text tokens against the
    tokenizer's model_max_length (Flan-T5: 512). InstructBLIP's Q-Former also reads the question, on
    its own positions (512), where transformers would stop the whole run with a RuntimeError."""
    config = model.config
    enc_dec, model_type = config.get_text_config().is_encoder_decoder, config.model_type
    prompts = {column: vqa_prompt(processor, model_type, text)[0] for column, text in captions.items()}
    inputs = processor(images=[frame] * len(prompts), text=list(prompts.values()), padding=True, return_tensors="pt")
    mask = inputs["attention_mask"].bool()  # (2, L): the tokens each prompt uses
    checks = []  # (tokens each prompt uses (2,), the most the model takes, what they are)
    if "qformer_attention_mask" in inputs:  # InstructBLIP: the question in the Q-Former, checked first (it would crash)
        checks.append((inputs["qformer_attention_mask"].sum(1), config.qformer_config.max_position_embeddings,
                       "Q-Former positions"))
    if enc_dec:  # the text tokens: the image's slots (BLIP's query tokens, CLIP-FlanT5's patches) apart
        image = IMAGE if model_type == "clip_t5" else getattr(config, "image_token_id", None)
        used = (mask & (inputs["input_ids"] != image)).sum(1)
        checks.append((used, processor.tokenizer.model_max_length, "text tokens"))
    else:  # every position the LLM reads: the prompt, the image's tokens, a_1..a_{k-1}
        k = len(answer_ids(processor.tokenizer, *vqa_prompt(processor, model_type, "x"), False, vqascore))
        checks.append((mask.sum(1) + k - 1, max_positions(model), "positions"))
    for used, limit, what in checks:
        for column, n in zip(prompts, used.tolist()):
            if n > limit:
                return f"its {column} makes a prompt of {n} {what}, past the model's {limit}: not scored"
    return None


# ---- §4: the per-frame VQAScores of one synthetic video V^s, against t^s and t^r --------------------
def score_video(model, processor, frames, t_s, t_r, pairs_per_forward=8, vqascore="first_token"):
    """Per-frame VQAScores of (V^s, t^s) and (V^s, t^r): T frames x 2 captions = 2T pairs, by default
    one call, each frame encoded once for both captions (frame_scores; pairs_per_forward // 2 frames a
    call, at least one). frames: uint8 (T, H, W, 3). Returns two lists of T floats."""
    # a caption past the member's context is not scored (its scores would be silently wrong): the row is
    # kept without a weight, named and counted, like an undecodable V^s
    if overflow := past_context(model, processor, frames[0], {"neg_caption": t_s, "caption": t_r}, vqascore):
        raise ValueError(overflow)
    # row 0: the T frames against t^s, row 1: against t^r
    p = frame_scores(model, processor, frames, [t_s, t_r], max(1, pairs_per_forward // 2), vqascore)  # (2, T)
    # a NaN would pass through fbar and phi to a NaN weight: it is a failed row instead
    if not torch.isfinite(p).all():
        raise ValueError(f"non-finite VQAScore {p.tolist()}")
    return p[0].tolist(), p[1].tolist()


def score_row(args, model, processor, rows, i, key, root, name, dist):
    """Row i's cache record for one member: {key, target: T VQAScores of (V^s, t^s), real: T of (V^s, t^r)},
    or {key, error} when its video cannot be scored (--strict: a UserError naming the CSV's line)."""
    row = rows[i]
    # t^s is the negative caption V^s was generated from, t^r the real video's caption
    try:
        path = row["syn_video"] if os.path.isabs(row["syn_video"]) else os.path.join(root, row["syn_video"])
        frames = read_video(path, args.num_frames, "uniform")  # (T, H, W, 3) uint8
        target, real = score_video(model, processor, frames, row["neg_caption"], row["caption"],
                                   args.pairs_per_forward, args.vqascore)
        return {"key": key, "target": target, "real": real}
    except (FileNotFoundError, ValueError) as e:  # missing / undecodable video, caption too long, NaN score
        message = f"{args.generated_csv}:{rows.lines[i]} ({row['syn_video']}), model {name}: {e}"
        if args.strict:
            raise UserError(message) from e
        tqdm.write(f"[rank {dist.rank}] skipping {message}")  # above the progress bar, not through it
        # the error is cached too, for the skip list; the next run scores the row again
        return {"key": key, "error": str(e)}


def score_ensemble(args, rows, keys, names, found, todo, root, cache, dist):
    """§4: every member's per-frame VQAScores of the rows it has not scored yet (todo: row indices per
    member), this rank's share of them, each video's record appended to the member's cache at once."""
    # one model at a time: the whole ensemble never shares a GPU
    for model_id, name, where, rows_todo in zip(args.models, names, found, todo):
        mine = shard(rows_todo, dist)  # the work left is split evenly, however much was cached
        if not mine:
            continue  # nothing left for this member on this rank: it is never loaded
        model, processor = load_member(model_id, device=dist.device, found=where)
        print0(f"{name}: prompt {vqa_prompt(processor, model.config.model_type, '<t>')[0]!r}")
        path = os.path.join(cache, name, f"rank{dist.rank}.jsonl")
        with naming_write_errors(path), open_part(path) as part:  # a full disk names this file
            for i in progress(mine, desc=f"VQAScore {name}"):
                record = score_row(args, model, processor, rows, i, keys[i], root, name, dist)  # scores or error
                part.write(json.dumps(record) + "\n")
                part.flush()  # a killed run keeps every finished video
        # free this member's memory before the next one loads
        del model, processor
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


# ---- §5 Eq. (4): fbar and phi --------------------------------------------------------------------
#     fbar(V^s, t) = mean over members m of (1/T) sum_frames VQAScore_m(frame, t),   t = t^s or t^r
#     w = phi(fbar(V^s, t^s), fbar(V^s, t^r)),   phi = max(0, . - .) in Eq. (4), or a row of Table 4
def with_fbar(row, key, names, caches):
    """The row + each member's VQAScores averaged over frames (vqascore_{target,real}_<member>) + their
    mean over members: score_syn_target = fbar(V^s, t^s), score_syn_real = fbar(V^s, t^r)."""
    out = dict(row)  # generated.csv's columns unchanged, the scores appended
    for name, (done, _) in zip(names, caches):
        out[f"vqascore_target_{name}"] = float(np.mean(done[key]["target"]))  # mean over frames
        out[f"vqascore_real_{name}"] = float(np.mean(done[key]["real"]))
    out["score_syn_target"] = float(np.mean([out[f"vqascore_target_{n}"] for n in names]))  # fbar(Vs, ts)
    out["score_syn_real"] = float(np.mean([out[f"vqascore_real_{n}"] for n in names]))  # fbar(Vs, tr)
    return out


def weigh(rows, keys, names, caches, weighting):
    """Eq. (4) / Table 4: fbar and w = phi of every row that every member scored -> (every row, in order,
    with its scores and weight, or none where a member could not score its V^s; those rows again, each
    with a skip_reason naming each member's error)."""
    out, skipped = [], []
    for line, row, key in zip(rows.lines, rows, keys):
        # a row lacks fbar if any member failed on it (or, after a kill, never got to it)
        missing = [(n, failed.get(key, "not scored")) for n, (done, failed) in zip(names, caches) if key not in done]
        if missing:
            # kept, its score and weight cells empty: 03_train.py trains its real triplet (V^r, t^r, t^s)
            # on L_real alone ("trained without a twin"); dropped, the real triplet would be lost too
            out.append(dict(row))
            why = "; ".join(f"{n}: {e}" for n, e in missing)  # each member's error
            skipped.append({"line": line, **row, "skip_reason": f"kept without a weight: {why}"})
            continue
        out.append(with_fbar(row, key, names, caches))
    scored = [r for r in out if "score_syn_target" in r]  # the rows with fbar, which get a weight
    phi = WEIGHTINGS[weighting]  # Table 4 / Eq. (4), on all rows at once
    weights = phi(np.array([r["score_syn_target"] for r in scored]), np.array([r["score_syn_real"] for r in scored]))
    # a phi that returns a scalar (a constant) gives that weight to every row
    weights = np.broadcast_to(np.asarray(weights, dtype=float), (len(scored),))
    if not np.isfinite(weights).all():
        bad = [r["syn_video"] for r, w in zip(scored, weights) if not np.isfinite(w)]
        raise ValueError(f"weighting {weighting!r} gave a non-finite weight for {bad[:5]}")
    for r, w in zip(scored, weights):
        r["weight"] = float(w)  # w in Eq. (5)'s weighted L_syn (03_train.py)
    return out, skipped


def write_weighted(out_csv, stem, rows, names, weighted, skipped):
    """weighted.csv (generated.csv's columns + each member's scores + fbar twice + weight; a row without
    scores has those cells empty) and the skip list: those rows, then the bad rows disk.read_csv left
    out (rows.skipped: a wrong field count, an empty text, an exact duplicate), each with its line."""
    columns = list(rows[0]) if rows else list(REQUIRED)  # generated.csv's own columns (REQUIRED if no row)
    scores = [f"vqascore_{s}_{n}" for n in names for s in ("target", "real")]
    write_csv(out_csv, weighted, columns + scores + ["score_syn_target", "score_syn_real", "weight"])  # missing: ""
    bad = [{"line": line, "skip_reason": f"left out: {kind}"} for kind, lines in rows.skipped.items() for line in lines]
    listed = sorted(skipped + bad, key=lambda r: r["line"])  # in file order, each row once
    if listed:
        write_csv(stem + "_skipped.csv", listed, ["line", *columns, "skip_reason"])
    elif os.path.exists(stem + "_skipped.csv"):  # an earlier run's list, now scored
        os.remove(stem + "_skipped.csv")
    # one count of each: this line, <stem>.json's kept_without_weight and bad_rows_skipped, the skip list's rows
    print0(f"wrote {out_csv}: {len(weighted) - len(skipped)} rows weighted; {len(skipped)} kept without a weight "
           f"(their V^s could not be scored); {len(bad)} bad rows skipped"
           + (f"; each listed with the reason in {stem}_skipped.csv" if listed else ""))
    return len(bad)


# ---- §4 Fig. 2: distribution of fbar(V^s,t^s) - fbar(V^s,t^r) per misalignment type ---------------
# In the paper's Fig. 2 the mean is below 0 for flip and hallucination: the ensemble rates V^s as
# showing t^r better than its own t^s (PAPER_FIG2_MEANS).
def fig2_table(rows):
    """{misalignment type: {n, mean, std}} of fbar(V^s,t^s) - fbar(V^s,t^r)."""
    by_type = {}
    for r in rows:  # a row without a type counts under "(none)"
        by_type.setdefault(r["misalignment"] or "(none)", []).append(r["score_syn_target"] - r["score_syn_real"])
    return {k: {"n": len(v), "mean": float(np.mean(v)), "std": float(np.std(v))} for k, v in sorted(by_type.items())}


def plot_fig2(rows, path):
    """One histogram of fbar(V^s,t^s) - fbar(V^s,t^r) per misalignment type, written to `path` (PNG)."""
    import matplotlib
    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt
    table = fig2_table(rows)
    cols, nrows = min(4, len(table)), -(-len(table) // 4)  # ceil
    fig, axes = plt.subplots(nrows, cols, figsize=(3.2 * cols, 2.8 * nrows), squeeze=False)
    for ax in axes.flat[len(table):]:
        ax.axis("off")  # the grid's unused panels
    for ax, (kind, stats) in zip(axes.flat, table.items()):
        diffs = [r["score_syn_target"] - r["score_syn_real"] for r in rows if (r["misalignment"] or "(none)") == kind]
        ax.hist(diffs, bins=np.linspace(-1, 1, 41), color="tab:blue")  # bins of 0.05 over [-1, 1]
        ax.axvline(stats["mean"], color="tab:red", label=f"mean {stats['mean']:+.2f}")
        ax.axvline(0, color="black", linewidth=0.5)  # right of 0: V^s shows t^s better than t^r
        ax.set(title=f"{kind} (n={stats['n']})", xlabel=r"$\bar f(V^s,t^s) - \bar f(V^s,t^r)$",
               ylabel="synthetic videos")
        ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(path) as tmp:  # a full disk names the figure
        fig.savefig(tmp, dpi=120)
    plt.close(fig)


def report_fig2(args, scored, stem, counts):
    """Fig. 2's table (ours beside the paper's means) printed, its histograms to <stem>_fig2.png, and
    <stem>.json: the settings, the table and `counts` (how many rows were weighted, kept without a weight)."""
    table = fig2_table(scored)
    print0(f"{'misalignment':<16}{'n':>6}{'mean':>9}{'std':>8}{'paper mean':>12}")
    for kind, s in table.items():
        paper = PAPER_FIG2_MEANS.get(kind)  # None for a type the paper has not ("(none)", a new one)
        print0(f"{kind:<16}{s['n']:>6}{s['mean']:>+9.3f}{s['std']:>8.3f}{'' if paper is None else f'{paper:+.2f}':>12}")
    if scored:
        plot_fig2(scored, stem + "_fig2.png")
    save_json(stem + ".json", {"args": vars(args), "fig2": table, **counts})
    return table


# ---- §4 Fig. 2 over several runs: the paper's is the mean over its three generators --------------
# --fig2_only reads each run's weighted.csv (fbar(V^s,t^s) and fbar(V^s,t^r) are there): no model is loaded
FIG2_COLUMNS = ("misalignment", "score_syn_target", "score_syn_real")  # what Fig. 2 reads of a weighted.csv


def fig2_scores(path, line, row):
    """A weighted.csv row as Fig. 2 reads it: {misalignment, score_syn_target, score_syn_real} as floats;
    None if both score cells are empty (02 kept the row without a weight). Any other cell that is not a
    VQAScore (a number in [0, 1]) is an error naming file:line."""
    cells = [row["score_syn_target"].strip(), row["score_syn_real"].strip()]  # fbar(Vs, ts), fbar(Vs, tr)
    if not any(cells):
        return None  # its V^s could not be scored: not part of Fig. 2
    try:
        ft, fr = map(float, cells)
    except ValueError:
        ft = fr = float("nan")  # caught just below, with the cells named
    if not (0 <= ft <= 1 and 0 <= fr <= 1):  # fbar is a mean of probabilities; NaN fails too
        raise UserError(f"{path}:{line}: score_syn_target {cells[0]!r}, score_syn_real {cells[1]!r}: "
                        "not two numbers in [0, 1]")
    return {"misalignment": row["misalignment"], "score_syn_target": ft, "score_syn_real": fr}


def fig2_of_runs(args):
    """--fig2_only: Fig. 2 and its table over the union of several runs' weighted.csv (e.g. one per
    generator), each row with its own run's scores, the means over every scored row of every file;
    rows without scores are left out and counted. Writes <--out_csv stem>_fig2.png and .json."""
    if not args.out_csv or args.generated_csv:
        raise UserError("--fig2_only needs --out_csv (the figure and JSON go beside it) and no --generated_csv")
    stem = os.path.splitext(args.out_csv)[0]
    # a run's own weighted_fig2.png and weighted.json are never overwritten by the pooled ones
    if any(os.path.abspath(os.path.splitext(p)[0]) == os.path.abspath(stem) for p in args.fig2_only):
        raise UserError(f"--out_csv {args.out_csv}: a file of --fig2_only; its run's figure and JSON would be "
                        "overwritten: pass another --out_csv")
    scored, files = [], {}
    for path in args.fig2_only:
        rows = read_csv(path, required=FIG2_COLUMNS)  # a file without the score columns: an error naming it
        mine = [fig2_scores(path, line, r) for line, r in zip(rows.lines, rows)]  # None: no scores
        scored += [r for r in mine if r is not None]  # the union: each row keeps its own run's fbar
        files[path] = {"rows": len(rows), "without_scores": mine.count(None)}
        print0(f"{path}: {len(rows)} rows, {mine.count(None)} without scores (left out of Fig. 2)")
    if not scored:
        raise UserError(f"--fig2_only {args.fig2_only}: no row has scores")
    os.makedirs(os.path.dirname(os.path.abspath(stem)), exist_ok=True)  # e.g. a new folder for the pooled figure
    report_fig2(args, scored, stem, {"weighted": len(scored), "files": files})
    return stem + ".json"


def main(args):
    """§4's VQAScores, Eq. (4)'s weights, Fig. 2. Returns weighted.csv's path on rank 0, None on the others
    (--fig2_only: Fig. 2 of existing weighted.csv files, no model; the path of its JSON)."""
    if args.fig2_only:  # Fig. 2 over several runs (the paper's three generators): read, not scored
        return fig2_of_runs(args)
    dist = setup_distributed()
    # ---- the flags, the members and the input, all checked before anything is read or written ----
    names = check_flags(args)  # each member's score columns and cache folder
    found = find_members(args.models)  # every member found (seconds) before any loads, all missing named
    # one row per V^s (syn_video), with t^s (neg_caption) and t^r (caption)
    rows = read_csv(args.generated_csv, required=REQUIRED, texts=("caption", "neg_caption", "syn_video"))
    rows = keep_split(rows, args.split, args.generated_csv)  # never the rows 04 evaluates on
    root = os.path.dirname(os.path.abspath(args.generated_csv))  # syn_video is relative to the CSV's folder
    out_csv = args.out_csv or os.path.join(root, "weighted.csv")
    stem = os.path.splitext(out_csv)[0]  # <dir>/weighted: the JSON, figure, skip list and cache share it
    cache = stem + "_cache"
    keys = [row_key(r) for r in rows]  # (V^s, t^s, t^r) of each row, as the cache knows it
    first = {}  # key -> the first row that has it: a repeated row is scored once
    for i, k in enumerate(keys):
        first.setdefault(k, i)

    # ---- resume: what each member's cache already holds (its settings checked first) ----
    todo = resume(args, names, cache, first, dist)  # row indices left to score, per member
    print0(f"{len(rows)} rows, {len(first)} synthetic videos; to score per model: "
           + ", ".join(f"{n} {len(t)}" for n, t in zip(names, todo)))

    # ---- §4: per-frame VQAScores of (V^s, t^s) and (V^s, t^r), every member, sharded over ranks ----
    score_ensemble(args, rows, keys, names, found, todo, root, cache, dist)
    if not all_ranks_finished(cache, dist):
        return None  # rank 0 alone merges

    # ---- §5 Eq. (4): fbar and phi, from every rank's cache ----
    caches = [read_cache(os.path.join(cache, name)) for name in names]
    weighted, skipped = weigh(rows, keys, names, caches, args.weighting)  # every row; those without a weight
    if len(skipped) == len(weighted):  # nothing usable: an error, and no record that refuses the rerun
        refuse_empty_run(args, names, cache, caches, skipped)
    bad = write_weighted(out_csv, stem, rows, names, weighted, skipped)

    # ---- §4 Fig. 2 and its table of means, over the rows with scores ----
    table = report_fig2(args, [r for r in weighted if "weight" in r], stem, {
        "weighted": len(weighted) - len(skipped), "kept_without_weight": len(skipped), "bad_rows_skipped": bad})
    if args.gallery:  # Fig. 2 to look at: each V^s beside V^r, its captions, fbar and phi
        write_gallery(args, out_csv, names, root, table)
    return out_csv


# ===== Plumbing: checks, CLIP-FlanT5 loading, the score cache, resume. A first reader may skip it. ====

# ---- what a user gave, checked before any work: flags, members, and a run that weighed nothing --------
def check_flags(args):
    """The flags argparse cannot check (its Literal types refuse a wrong --vqascore or --weighting):
    a UserError names each. Returns each member's name (member_name)."""
    if not args.generated_csv:
        raise UserError("--generated_csv is required: the generated.csv that 01_generate.py wrote")
    if args.num_frames < 1 or args.pairs_per_forward < 1:
        raise UserError(f"--num_frames {args.num_frames}, --pairs_per_forward {args.pairs_per_forward}: each at least 1")
    names = [member_name(m) for m in args.models]  # each member's score columns and cache folder
    if len(set(names)) != len(names):
        raise UserError(f"two ensemble members share a name {names}: their score columns would collide")
    return names


def find_member(model_id):
    """Where a member of --models loads from, found in seconds (video_llm.resolve_model: a typo, a missing
    folder, no network) before any member is loaded or any video read: {"path"}, and for CLIP-FlanT5 the
    two models its checkpoint names, {"tower": its CLIP vision tower, "tokenizer": Flan-T5's if it has none}."""
    from transformers import PretrainedConfig
    from transformers.utils import cached_file
    path = resolve_model(model_id, "--models")
    try:
        config = PretrainedConfig.get_config_dict(path)[0]
    except OSError as e:  # a folder that holds no model
        raise UserError(f"--models {model_id}: not a transformers model ({str(e).splitlines()[0]})") from None
    if config.get("model_type") != "clip_t5":
        return {"path": path}
    # t2v_metrics reads google/flan-t5-xxl's tokenizer (the same for -xl) unless the checkpoint has one
    own = cached_file(path, "tokenizer_config.json", _raise_exceptions_for_missing_entries=False)
    return {"path": path, "tower": resolve_model(config["mm_vision_tower"], f"--models {model_id}: its mm_vision_tower"),
            "tokenizer": path if own else resolve_model("google/flan-t5-xxl", f"--models {model_id}: its tokenizer")}


def find_members(models):
    """find_member for each of --models; the members that are not there are named in ONE error, so a
    user fixes them all at once instead of one rerun per member."""
    found, missing = [], []
    for model_id in models:
        try:
            found.append(find_member(model_id))
        except UserError as e:
            missing.append(str(e))
    if missing:
        raise UserError("; ".join(missing))
    return found


def refuse_empty_run(args, names, cache, caches, skipped):
    """A run that weighed no row stops with the first row's reason (its file:line and video path). A
    member's cache that holds no score is removed with its settings record: a corrected rerun (another
    CSV, folder or model) then starts afresh instead of being refused as made with other settings."""
    for name, (done, _) in zip(names, caches):
        if not done:  # only errors: nothing to resume
            shutil.rmtree(os.path.join(cache, name), ignore_errors=True)
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(cache, f"{name}.json"))
    first, reason = skipped[0], skipped[0]["skip_reason"].removeprefix("kept without a weight: ")
    hint = "; syn_video is read relative to the CSV's folder" if "not found" in reason else ""
    raise UserError(f"{args.generated_csv}: none of its {len(skipped)} rows could be weighed, e.g. "
                    f"{args.generated_csv}:{first['line']} ({first['syn_video']}): {reason}{hint}")


# ---- CLIP-FlanT5 (Lin et al. 2024): FlanT5 whose encoder reads a CLIP image --------------------
# The released checkpoint's layout (t2v_metrics' CLIPT5ForConditionalGeneration): T5's own weights +
# vision_tower.vision_tower.* (a CLIPVisionModel, wrapped once) + mm_projector.{0,2}.* (mlp2x_gelu:
# Linear, GELU, Linear); config.json = T5's + mm_vision_tower, mm_projector_type, mm_vision_select_layer.
IMAGE = -200  # the image placeholder id in CLIP-FlanT5's input (t2v_metrics' value): no vocabulary id


def clip_t5_classes():
    """CLIP-FlanT5's model and processor classes, defined on first use (transformers loads lazily)."""
    from transformers import BatchFeature, CLIPVisionConfig, CLIPVisionModel, T5Config, T5ForConditionalGeneration

    class CLIPT5Config(T5Config):
        model_type = "clip_t5"

    class CLIPFlanT5(T5ForConditionalGeneration):
        config_class = CLIPT5Config

        def __init__(self, config):
            super().__init__(config)
            kind = getattr(config, "mm_projector_type", "linear"), getattr(config, "mm_vision_select_feature", "patch")
            if kind != ("mlp2x_gelu", "patch"):
                raise UserError("CLIP-FlanT5: only the released mlp2x_gelu projector of patch features is built")
            self.vision_tower = torch.nn.Module()  # t2v_metrics' wrapper around the CLIP vision model
            self.vision_tower.vision_tower = CLIPVisionModel(CLIPVisionConfig.from_pretrained(config.mm_vision_tower))
            width = self.vision_tower.vision_tower.config.hidden_size
            # CLIP's width -> T5's d_model: a patch becomes one input embedding of T5's encoder
            self.mm_projector = torch.nn.Sequential(torch.nn.Linear(width, config.d_model), torch.nn.GELU(),
                                                    torch.nn.Linear(config.d_model, config.d_model))

        def get_image_features(self, pixel_values):
            """The images' patches as T5 input embeddings (.pooler_output, as transformers' members give it)."""
            hidden = self.vision_tower.vision_tower(pixel_values, output_hidden_states=True).hidden_states
            image = self.mm_projector(hidden[self.config.mm_vision_select_layer][:, 1:])  # (n, patches, d): no CLS
            return SimpleNamespace(pooler_output=image)

        def forward(self, input_ids, pixel_values=None, mm_encoder_outputs=None, **kwargs):
            """T5 on the prompt's embeddings, the image's patches in place of its IMAGE placeholders
            (mm_encoder_outputs: the patches already encoded, given_image)."""
            image = (mm_encoder_outputs or {}).get("image") or self.get_image_features(pixel_values)
            image = image.pooler_output  # (n, patches, d)
            embeds = self.get_input_embeddings()(input_ids.clamp(min=0))  # (n, L, d)
            # the n x patches IMAGE slots, in order, take the n images' patches
            embeds = embeds.masked_scatter((input_ids == IMAGE)[..., None], image.to(embeds.dtype))
            return super().forward(inputs_embeds=embeds, **kwargs)

    class CLIPFlanT5Processor:
        """t2v_metrics' input: CLIP preprocessing of a (padded) frame; the prompt's text on either side
        of "<image>" tokenised apart, each with its end token, and one IMAGE per patch between them."""

        def __init__(self, tokenizer, image_processor, num_patches):
            self.tokenizer, self.image_processor, self.num_patches = tokenizer, image_processor, num_patches

        def __call__(self, images, text, return_tensors="pt", **unused):
            sides = [self.tokenizer(prompt.split("<image>"))["input_ids"] for prompt in text]  # [before, after]
            rows = [before + [IMAGE] * self.num_patches + after for before, after in sides]  # ids, unpadded
            pad = self.tokenizer.pad_token_id
            input_ids = torch.tensor([r + [pad] * (max(map(len, rows)) - len(r)) for r in rows])  # (n, L) right-padded
            pixels = self.image_processor(images=images, return_tensors="pt")["pixel_values"]  # (n, 3, H, W)
            return BatchFeature({"input_ids": input_ids, "attention_mask": (input_ids != pad).long(),
                                 "pixel_values": pixels}, tensor_type=return_tensors)

    return CLIPFlanT5, CLIPFlanT5Processor


def load_member(model_id, device="cpu", found=None):
    """An ensemble member and its processor: every model by transformers' Auto classes (common.
    load_video_llm) but CLIP-FlanT5 (model_type "clip_t5"), from its released checkpoint. That may lack
    the frozen vision tower's weights: they come from mm_vision_tower then, as in t2v_metrics.
    found: find_member's answer (where the member and its parts load from), looked up if not given."""
    from transformers import AutoTokenizer, CLIPImageProcessorPil, CLIPVisionModel
    found = found or find_member(model_id)
    if "tower" not in found:
        return load_video_llm(found["path"], device=device)
    model_class, processor_class = clip_t5_classes()
    dtype = torch.bfloat16 if str(device).startswith("cuda") else torch.float32  # bfloat16: ~25 GB for an XXL
    tower = found["tower"]  # mm_vision_tower as found: a hub id with no network is its cached folder
    model, info = model_class.from_pretrained(found["path"], dtype=dtype, output_loading_info=True, mm_vision_tower=tower)
    missing = info["missing_keys"]
    if any(k.startswith("vision_tower.") for k in missing):
        model.vision_tower.vision_tower = CLIPVisionModel.from_pretrained(tower, dtype=dtype)
    if any(not k.startswith("vision_tower.") for k in missing):
        raise UserError(f"--models {model_id}: not a CLIP-FlanT5 checkpoint, it lacks {sorted(missing)[:5]}")
    tokenizer = AutoTokenizer.from_pretrained(found["tokenizer"], config=model.config)  # its own, or Flan-T5's
    model.resize_token_embeddings(len(tokenizer))  # as t2v_metrics: T5's 32128 padded rows -> the 32100 tokens
    vision = model.vision_tower.vision_tower.config
    processor = processor_class(tokenizer, CLIPImageProcessorPil.from_pretrained(tower),
                                (vision.image_size // vision.patch_size) ** 2)  # one IMAGE slot per patch
    return model.to(device).eval(), processor


# ---- the cache: one JSON line per (member, video) -------------------------------------------------
# <stem>_cache/<member>/rank<r>.jsonl holds {key, target, real} (T per-frame VQAScores each) or
# {key, error}; <stem>_cache/<member>.json the settings it was made with; finished.rank<r> that a rank
# is done. Records are keyed by content (row_key), so any number of ranks, or a rerun, finds them.
def member_name(model_id):
    """A short column-safe name for an ensemble member: the last part of its hub id or folder."""
    return re.sub(r"[^\w.-]", "_", os.path.basename(os.path.normpath(model_id)))


def row_key(row):
    """A row's identity in the cache: its synthetic video and both captions (not its position)."""
    return json.dumps([row["syn_video"], row["neg_caption"], row["caption"]])


def read_cache(folder):
    """{key: record} of every scored video in a model's cache folder, all ranks' files together;
    {key: error} of rows that failed (retried by the next run). A line cut by a kill is ignored."""
    done, failed = {}, {}
    for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        with open(os.path.join(folder, name), encoding="utf-8") as fh:
            for line in fh:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue  # the half line a killed run left
                if "error" in record:
                    failed[record["key"]] = record["error"]
                else:
                    done[record["key"]] = record
    # an error that a later run scored away no longer counts
    return done, {k: e for k, e in failed.items() if k not in done}


def open_part(path):
    """Open a rank's cache file to append, first ending a line that a killed run left unfinished."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if os.path.exists(path) and os.path.getsize(path) > 0:
        with open(path, "rb") as fh:
            fh.seek(-1, os.SEEK_END)
            cut = fh.read() != b"\n"
        if cut:  # the cut line stays, unparsable, and read_cache skips it
            with open(path, "a", encoding="utf-8") as fh:
                fh.write("\n")
    return open(path, "a", encoding="utf-8")


# ---- resume and the ranks' end ---------------------------------------------------------------------
def resume(args, names, cache, first, dist):
    """Each member's row indices still to score. Its cache is reused only if it holds scores of this
    CSV with these settings (else a ValueError naming them); every rank reads the caches, then all
    agree before anyone writes to them."""
    source = file_hash(args.generated_csv)
    for model_id, name in zip(args.models, names):
        # what changes a member's scores: the input's content, the model, T, the VQAScore's definition
        settings = {"generated_csv": source, "model": model_id, "num_frames": args.num_frames,
                    "vqascore": args.vqascore}
        check_resume(os.path.join(cache, f"{name}.json"), settings, dist)
    caches = [read_cache(os.path.join(cache, name)) for name in names]
    todo = [[first[k] for k in first if k not in done] for done, _ in caches]  # row indices per model
    if dist.master:  # an earlier run's end-of-work markers
        for marker in glob.glob(os.path.join(cache, "finished.rank*")):
            os.remove(marker)
    if dist.world_size > 1:
        torch.distributed.barrier()
    return todo


def all_ranks_finished(cache, dist):
    """Mark this rank done and leave the process group. True on rank 0, once every rank is done
    (the merge is its alone); False on the other ranks at once."""
    marker = os.path.join(cache, f"finished.rank{dist.rank}")
    with naming_write_errors(marker):  # a read-only folder or a full disk names it
        os.makedirs(cache, exist_ok=True)
        open(marker, "w").close()
    if dist.world_size > 1:
        torch.distributed.destroy_process_group()
    if not dist.master:
        return False
    # not a barrier: a collective would time out while a slow rank still scores its last videos
    wait_for_files(os.path.join(cache, f"finished.rank{r}") for r in range(dist.world_size))
    return True



# ===== Plumbing, the gallery: Fig. 2 as a page to look at. A first reader may skip it. =====================
# ---- §4 Fig. 2, to look at: each V^s beside V^r, their captions, fbar and phi, in one HTML page -----
# Fig. 2 says that flip and hallucination negatives give videos that show t^r better than t^s, and
# Eq. 4 should weigh those near 0: the gallery lets a reader see it, video by video. One file, the
# frames inline (base64 JPEG thumbnails), no script and no request: it opens from disk anywhere.
GALLERY_HEIGHT = 72  # px: a frame's height on the page
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
    picks = {}
    for kind, group in sorted(by_type.items()):
        group.sort(key=lambda x: -float(x[1]["weight"]))  # phi, highest first
        # Fig. 2's claim in pictures: the highest phi should be faithful V^s, the lowest failed ones
        mid = max(0, (len(group) - per_type) // 2)
        sections = {"highest phi": range(per_type), "middle": range(mid, mid + per_type),
                    "lowest phi": range(len(group) - per_type, len(group))}
        shown = {}  # index -> its section: a row in two sections (a small type) is shown once
        for section, indices in sections.items():
            for i in indices:
                if 0 <= i < len(group):
                    shown.setdefault(i, section)
        picks[kind] = [(shown[i], *group[i]) for i in sorted(shown)]
    return picks


def thumbnails(path, num_frames):
    """<img> tags of the num_frames frames 02 scores (uniform sampling), or a named placeholder if the
    video cannot be read: the page never breaks on a bad video."""
    import base64
    from PIL import Image
    try:
        frames = read_video(path, num_frames)  # (T, H, W, 3) uint8, the frames the VQA members saw
    except (OSError, ValueError) as e:
        return f'<span class="missing">{html.escape(str(e))}</span>'
    tags = []
    for frame in frames:
        image = Image.fromarray(frame)
        image.thumbnail((4 * GALLERY_HEIGHT, GALLERY_HEIGHT))  # at most 72 px high (CSS scales a toy frame up)
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=85)
        data = base64.b64encode(buffer.getvalue()).decode()
        tags.append(f'<img src="data:image/jpeg;base64,{data}" alt="frame">')
    return "".join(tags)


def marked(caption, other):
    """The caption, HTML-escaped, its words outside LCS(t^r, t^s) marked: what t' hides (footnote 2)."""
    out, last = [], 0
    for start, end in hidden_word_spans(caption, other):
        out += [html.escape(caption[last:start]), f"<mark>{html.escape(caption[start:end])}</mark>"]
        last = end
    return "".join(out + [html.escape(caption[last:])])


def gallery_entry(args, names, root, csv_name, section, line, r):
    """One V^s: V^r's and V^s's frames, t^r and t^s with their differing words marked, each member's
    fbar on both captions, fbar(V^s,t^s) - fbar(V^s,t^r), phi and the CSV line."""
    real = (thumbnails(os.path.join(args.video_root, r["videopath"]), args.num_frames) if args.video_root
            else '<span class="missing">V^r not shown: pass --video_root</span>')
    syn = thumbnails(os.path.join(root, r["syn_video"]), args.num_frames)  # syn_video: relative to the CSV
    cells = "".join(f"<tr><th>{html.escape(n)}</th><td>{float(r[f'vqascore_target_{n}']):.3f}</td>"
                    f"<td>{float(r[f'vqascore_real_{n}']):.3f}</td></tr>" for n in names)
    diff = float(r["score_syn_target"]) - float(r["score_syn_real"])
    return (f'<div class="entry"><div><div class="frames"><span class="tag">V<sup>r</sup></span>{real}</div>'
            f'<div class="frames"><span class="tag">V<sup>s</sup></span>{syn}</div>'
            f'<p class="where">{section} · {html.escape(csv_name)}:{line}</p></div><div>'
            f'<p><b>t<sup>r</sup></b> {marked(r["caption"], r["neg_caption"])}<br>'
            f'<b>t<sup>s</sup></b> {marked(r["neg_caption"], r["caption"])}</p>'
            f"<table><tr><th></th><th>f&#772;(V<sup>s</sup>,t<sup>s</sup>)</th><th>f&#772;(V<sup>s</sup>,t<sup>r</sup>)"
            f"</th></tr>{cells}<tr><th>mean</th><td>{float(r['score_syn_target']):.3f}</td>"
            f"<td>{float(r['score_syn_real']):.3f}</td></tr></table>"
            f"<p>difference {diff:+.3f} · &phi; ({html.escape(args.weighting)}) = <b>{float(r['weight']):.3f}</b></p>"
            f"</div></div>")


def below_here(path):
    """A path as the page shows it: relative to the working folder when below it (no machine's
    /home/... or /tmp/... on a page that is shared), else as given (a hub id stays a hub id)."""
    return os.path.relpath(path) if os.path.isabs(path) and not os.path.relpath(path).startswith("..") else path


def write_gallery(args, out_csv, names, root, table):
    """<stem>_gallery.html: per misalignment type the V^s with the highest, middle and lowest phi
    (gallery_picks), each as gallery_entry draws it; a header with the run's settings and Fig. 2's
    per-type means (`table`: fig2_table) beside the paper's. Reads weighted.csv, the file it shows."""
    rows = read_csv(out_csv)  # the page shows what 03 will train on, read back from the file itself
    # the header: what made these scores, then Fig. 2's per-type means beside the paper's
    settings = {k: getattr(args, k) for k in ("generated_csv", "models", "vqascore", "weighting", "num_frames", "split")}
    settings["generated_csv"], settings["models"] = below_here(args.generated_csv), [below_here(m) for m in args.models]
    head = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>" for k, v in settings.items())
    fig2 = "".join(f"<tr><th>{html.escape(k)}</th><td>{s['n']}</td><td>{s['mean']:+.3f}</td>"
                   f"<td>{'' if PAPER_FIG2_MEANS.get(k) is None else f'{PAPER_FIG2_MEANS[k]:+.2f}'}</td></tr>"
                   for k, s in table.items())
    body = [f"<h1>{html.escape(below_here(out_csv))}</h1><table>{head}</table><h2>Fig. 2: f&#772;(V<sup>s</sup>,t<sup>s</sup>) - "
            f"f&#772;(V<sup>s</sup>,t<sup>r</sup>), the mean per type"
            f"</h2><table><tr><th>type</th><th>n</th><th>mean</th><th>paper</th></tr>{fig2}</table>"]
    for kind, picks in gallery_picks(rows, args.gallery_per_type).items():
        body.append(f'<h2>{html.escape(kind)}</h2><div class="type">')
        body += [gallery_entry(args, names, root, os.path.basename(out_csv), *p) for p in picks] + ["</div>"]
    page = (f'<!DOCTYPE html><html><head><meta charset="utf-8"><title>{html.escape(out_csv)}</title>'
            f"<style>{GALLERY_CSS}</style></head><body>{''.join(body)}</body></html>")
    path = os.path.splitext(out_csv)[0] + "_gallery.html"
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        fh.write(page)
    print0(f"wrote {path}: open it in a browser (no server, no network)")
    return path


if __name__ == "__main__":
    run_stage(main, Args)  # a user's mistake: `error: ...`, exit 2
