"""VQAScore (Lin et al. 2024) on image VQA models: the members of fbar, §4 and Eq. (4). Each family's
prompt and answer tokens as t2v_metrics (VQAScore's code) asks them, its inputs and the logits that
predict the answer; each frame of V^s encoded once for both captions t^s and t^r (frame_scores); and
a check that no prompt runs past a member's context (past_context)."""
from types import SimpleNamespace

import numpy as np
import torch

from common import answer_token_ids
from synvita.clip_t5 import IMAGE
from synvita.runs import UserError
from synvita.video_llm import max_positions

# §4's question, defined where every prompt is built (02_weight.py names it as VQA_QUESTION too)
VQA_QUESTION = 'Does this figure show "{caption}"? Please answer yes or no.'  # VQAScore's question
VQA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
              "The assistant gives helpful, detailed, and polite answers to the user's questions.")
# Prompts, answers and padding to a square follow t2v_metrics (VQAScore's code).
# (prompt, answer) of the families without a chat template, as t2v_metrics asks them (InstructBLIP
# answers "yes", CLIP-FlanT5 is asked in its "t5_chat" style). Every other family uses its processor's
# chat template; decoder-only models answer "Yes" (common.answer_token_ids), as t2v_metrics' LLaVA-1.5.
VQA_FORMATS = {
    "instructblip": ("Question: {question}", "yes"),
    "clip_t5": (VQA_SYSTEM + " USER: <image>\n{question} ASSISTANT: ", "Yes"),
    "blip-2": ("Question: {question} Answer:", "yes"),  # BLIP-2's VQA prompt
}
PAD_TO_SQUARE = ("clip_t5", "llava")  # t2v_metrics' image_aspect_ratio "pad"


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


def vqa_answer_ids(tokenizer, prompt, answer, encoder_decoder, vqascore):
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
    answer = torch.tensor(vqa_answer_ids(processor.tokenizer, *prompts[0], enc_dec, vqascore), device=model.device)
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


def vqa_answer_logits(model, inputs, answer, **image):
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
    log P(a_j | image, question, a_<j)) over the answer tokens a_1..a_k of vqa_answer_ids; first_token: P("Yes").

    images: list of n uint8 arrays (H, W, 3); captions: list of n texts. Pairs go through the model
    `pairs_per_forward` at a time. Returns a float tensor (n,) on the CPU."""
    images, prompts, answer = vqa_setup(model, processor, images, captions, vqascore)
    # decoder-only: left padding puts every prompt's end, where the answer starts, at the same place
    side = None if model.config.get_text_config().is_encoder_decoder else "left"
    scores = []
    for s in range(0, len(captions), pairs_per_forward):
        inputs = vqa_inputs(model, processor, images[s:s + pairs_per_forward], prompts[s:s + pairs_per_forward], side)
        scores.append(vqascore_of(vqa_answer_logits(model, inputs, answer), answer))  # (n,)
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
    the forward then skips its image side (and synvita/clip_t5.py's CLIPFlanT5 does the same)."""
    encoded = SimpleNamespace(pooler_output=features, qformer_outputs=None, vision_outputs=None)
    return {"pixel_values": None, "mm_encoder_outputs": {"image": encoded}}


def image_once_logits(model, inputs, answer, C):
    """BLIP-2, CLIP-FlanT5: the whole image side reads no text (BLIP-2's Q-Former its queries only;
    CLIP-FlanT5's CLIP tower + projector): it runs on each frame once, rows 0, C, 2C.. of the pairs, and
    each frame's encoding goes to its C pairs. -> vqa_answer_logits (n, k, vocab)."""
    features = model.get_image_features(inputs["pixel_values"][::C]).pooler_output  # (m, image tokens, d)
    return vqa_answer_logits(model, inputs, answer, **given_image(features.repeat_interleave(C, 0)))  # (n, ...)


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
    return vqa_answer_logits(model, inputs, answer, **given_image(model.language_projection(q)))  # (n, k, vocab)


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
        k = len(vqa_answer_ids(processor.tokenizer, *vqa_prompt(processor, model_type, "x"), False, vqascore))
        checks.append((mask.sum(1) + k - 1, max_positions(model), "positions"))
    for used, limit, what in checks:
        for column, n in zip(prompts, used.tolist()):
            if n > limit:
                return f"its {column} makes a prompt of {n} {what}, past the model's {limit}: not scored"
    return None

