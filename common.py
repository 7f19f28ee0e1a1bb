"""Shared pieces of SynViTA (Zanella et al., "Can Text-to-Video Generation help Video-Language
Alignment?", CVPR 2025), in three parts, to be read beside the paper's §3-§5:

Part 1, the equations: one small pure function per equation (Eqs. 1-7, Table 4, footnote 2),
        tensors in and tensors out, the formula in its docstring;
Part 2, f(V, t) on a video LLM: the entailment prompt, loading a model, and Eq. (1)'s forward
        pass, in which each video's prompt prefix runs once for all of its captions;
Part 3, plumbing: torchrun, seeds, printing, flags, CSV files, resume, and video files.
"""
import contextlib
import csv
import errno
import functools
import hashlib
import io
import logging
import os
import re
import shutil
import sys
import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

# =================================================================================================
# Part 1: the equations
# =================================================================================================
# Notation: the model's two answer logits give a = logit_Yes - logit_No, the "alignment logit" of
# one (video, text) pair, and f = sigmoid(a) (Eq. 1). Every loss takes alignment logits: log f =
# logsigmoid(a) and log(1 - f) = logsigmoid(-a) stay exact where f itself rounds to 0 or 1.
#
# NOTE (deviation): the paper writes every loss as a SUM over the i examples; we return the MEAN
# (sum / n) so that the loss scale, and hence the learning rate, does not depend on the batch size.


def alignment_logit(logit_yes, logit_no):
    """Eq. (1), the form the code computes: f(V,t) = P(Yes|V,t) / (P(Yes|V,t) + P(No|V,t))
    = sigmoid(a) with a = logit_Yes - logit_No, read where the answer starts. Returns a.

    The two-way softmax over {Yes, No} is a sigmoid of the logit difference, so a is all that Eqs.
    (2)-(6) need; alignment_score(a) gives f."""
    return logit_yes - logit_no


def alignment_score(a):
    """Eq. (1): f(V,t) = sigmoid(a), the alignment score in [0, 1]; never overflows, even at a = +-2e4."""
    return torch.sigmoid(a)


# ---- §3 Eq. (2), §4 Eq. (3), §5 Eqs. (5)-(7): the losses -----------------------------------------
def loss_real(a_pos, a_neg):
    """Eq. (2): L_real = -1/n sum_i [ log f(V_i, t_i+) + log(1 - f(V_i, t_i-)) ].

    a_pos: (n,) alignment logits of (real video, its caption t+);
    a_neg: (n,) alignment logits of (real video, the LLM-written negative t-)."""
    return -(F.logsigmoid(a_pos) + F.logsigmoid(-a_neg)).mean()  # log f = logsigmoid(a), log(1-f) = logsigmoid(-a)


def loss_syn(a_target, a_real, w=1.0):
    """Eq. (3): L_syn = -1/n sum_i [ log f(V_i^s, t_i^s) + log(1 - f(V_i^s, t_i^r)) ], and with
    per-example weights w, Eq. (5): L_syn^phi = -1/n sum_i w_i [ ... the same ... ].

    a_target: (n,) alignment logits of (synthetic video V^s, the caption t^s it was generated from);
    a_real:   (n,) alignment logits of (V^s, the real caption t^r), which V^s should NOT match;
    w:        (n,) weights w_i = phi(V^s, t^s, t^r) of Eq. (4) (or a Table 4 variant); 1 = Eq. (3).
    w_i = 0 removes example i exactly."""
    per_example = F.logsigmoid(a_target) + F.logsigmoid(-a_real)  # (n,) log f(V^s,t^s) + log(1 - f(V^s,t^r))
    return -(w * per_example).mean()


def loss_scr(a_own, a_shared, a_other, w, margin=0.2):
    """Eq. (6): L_scr^phi = 1/n sum_i w_i sum_{z in {s,r}} [ max(0, g + f(V^z, t') - f(V^z, t^z))
                                                         + max(0, g + f(V^z, t^zbar) - f(V^z, t')) ].

    Alignment logits of shape (n, 2): column 0 is z = s (synthetic video), column 1 is z = r (real).
    a_own    -> f(V^z, t^z)     the video's own caption
    a_shared -> f(V^z, t')      t' = the words that t^s and t^r share (footnote 2, see below)
    a_other  -> f(V^z, t^zbar)  the other video's caption
    It asks f(own) > f(shared) > f(other), each by the margin g (gamma = 0.2 in the paper), on the
    scores f themselves (Eq. 1), not on their logits. w: (n,) weights; margin: g."""
    f_own, f_shared, f_other = alignment_score(a_own), alignment_score(a_shared), alignment_score(a_other)
    above = F.relu(margin + f_shared - f_own)  # (n, 2): own caption beats the shared part
    below = F.relu(margin + f_other - f_shared)  # (n, 2): shared part beats the other caption
    return (w * (above + below).sum(dim=1)).mean()


def total_loss(l_real, l_syn, l_scr, lambda_scr):
    """Eq. (7): L = L_real + L_syn^phi + lambda_scr * L_scr^phi."""
    return l_real + l_syn + lambda_scr * l_scr


def answer_token_loss(logits, targets, w, n_tokens):
    """The released code's answer loss (03_train.py --answer_loss vocab), beside Eqs. (1)-(2):
        1/N sum_k w_k * -log softmax(logits_k)[target_k]
    over answer tokens k -- the word "Yes"/"No" AND the end-of-sequence token after it, or every
    token of an explanation and its end token -- each read from the FULL vocabulary, weighted by its
    pair's w (1 for real pairs, phi for synthetic ones), and divided by N = the number of answer
    tokens of the whole micro-batch, real and synthetic together (not by sum(w)).

    logits: (K, vocab) at the positions that predict the K tokens; targets: (K,) token ids;
    w: (K,) weights; n_tokens: N."""
    return (w * F.cross_entropy(logits.float(), targets, reduction="none")).sum() / n_tokens


# ---- §5 Eq. (4) and Table 4: the weight phi of a synthetic video --------------------------------
# Each function takes fbar(V^s, t^s) ("f_target": does V^s show the caption it was made from?) and
# fbar(V^s, t^r) ("f_real": does it show the real caption instead?), VQAScore-ensemble values in
# [0, 1], as tensors or numpy arrays of the same shape, and returns w of that shape.
#
# EXERCISE: add your own weighting here, e.g. "sqrt_diff": lambda ft, fr: (ft - fr).clip(0) ** 0.5.
# Every test parametrised over WEIGHTINGS and every stage's --weighting flag picks it up by name.
WEIGHTINGS = {
    "fixed": lambda ft, fr: ft * 0 + 1.0,  # Table 4 row 1: w = 1 (plain Eq. 3)
    "target": lambda ft, fr: ft,  # row 2: w = fbar(Vs, ts)
    "target_x_inv_real": lambda ft, fr: ft * (1 - fr),  # row 3: fbar(Vs,ts) (1 - fbar(Vs,tr))
    "indicator": lambda ft, fr: (ft > fr) * 1.0,  # row 4: 1[fbar(Vs,ts) > fbar(Vs,tr)]
    "difference": lambda ft, fr: (ft - fr).clip(0),  # row 5 = Eq. (4): max(0, fbar(Vs,ts) - fbar(Vs,tr))
}


# ---- §5 footnote 2: t' = LCS(t^r, t^s), applied as attention-level masking ----------------------
# t' is not fed as new text: it is the pair's own caption with the words outside the longest common
# subsequence of t^r and t^s hidden by the attention mask, so both videos see the shared words at
# the positions they have in the real prompt.
def longest_common_subsequence(a, b):
    """LCS of two sequences by dynamic programming; returns the common items in the order of `a`."""
    return [a[i] for i in lcs_indices(a, b)]


def lcs_indices(a, b):
    """Indices into `a` of one longest common subsequence of a and b.

    L[i][j] = length of the LCS of a[i:] and b[j:]; then walk the table from (0, 0)."""
    n, m = len(a), len(b)
    L = [[0] * (m + 1) for _ in range(n + 1)]
    for i in range(n - 1, -1, -1):
        for j in range(m - 1, -1, -1):
            L[i][j] = L[i + 1][j + 1] + 1 if a[i] == b[j] else max(L[i + 1][j], L[i][j + 1])
    out, i, j = [], 0, 0
    while i < n and j < m:
        if a[i] == b[j]:
            out.append(i)  # a[i] == b[j] is in the LCS: take it, move on in both
            i, j = i + 1, j + 1
        elif L[i + 1][j] >= L[i][j + 1]:
            i += 1
        else:
            j += 1
    return out


WORD = re.compile(r"\w+")


def hidden_word_spans(caption, other):
    """The character spans of the words of `caption` that are NOT in LCS(caption, other).

    t' is not new text: it is `caption` itself with these words hidden by the attention mask
    (footnote 2). Words are compared case-insensitively; characters that belong to no word
    (spaces, punctuation) stay visible. Returns [(start, end), ...] into `caption`.
    NOTE (deviation): the released code runs a character-level LCS over token-id strings; we take
    the LCS over words and map words to tokens by character offsets, so t' does not depend on how
    a tokenizer splits words."""
    words = list(WORD.finditer(caption))
    kept = set(lcs_indices([w.group().lower() for w in words], [w.group().lower() for w in WORD.finditer(other)]))
    return [w.span() for k, w in enumerate(words) if k not in kept]


def token_visibility(offsets, hidden_spans):
    """Map hidden character spans to tokens: a token is hidden if it overlaps any hidden span.

    offsets: [(start, end)] per token (a fast tokenizer's offset mapping, in the same text as the
    spans). Returns a list of bools, True = visible (attention mask 1)."""
    return [not any(s < he and hs < e for hs, he in hidden_spans) for s, e in offsets]


# =================================================================================================
# Part 2: f(V, t) on a video LLM (§3: the model is asked the entailment question, Eq. 1 reads its answer)
# =================================================================================================
DEFAULT_MODEL = "LanguageBind/Video-LLaVA-7B-hf"  # the paper's Video-LLaVA, as transformers ships it
QUESTION = 'Does this video entail the description: "{caption}"?'  # VideoCon's question
# Video-LLaVA's hub processor has no chat template: its prompt formats, by name (--prompt). The
# released code asks it in LLaVA's "llava_v1" conversation, a system sentence and then
# `USER: <video>\n<question> ASSISTANT:`; transformers' model card drops the system sentence. Every
# other family (LLaVA-OneVision, LLaVA-NeXT-Video, Qwen-VL, ...) uses its processor's chat template.
SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. "
          "The assistant gives helpful, detailed, and polite answers to the human's questions.")
PROMPT_FORMATS = {
    "llava_v1": SYSTEM + " USER: <video>\n{question} ASSISTANT:",  # the released code (default)
    "card": "USER: <video>\n{question} ASSISTANT:",  # the transformers model card
}


# ---- the prompt: where the caption sits, which tokens answer -------------------------------------
def entailment_prompt(processor, model_type, caption, prompt="llava_v1", question=QUESTION):
    """The prompt text up to where the answer starts, and where `caption` sits in it (char offset).
    prompt: a PROMPT_FORMATS name, used by Video-LLaVA; other families use their chat template.
    question: the question asked about `caption` (a template with one {caption} field)."""
    asked = question.format(caption=caption)  # e.g. Does this video entail the description: "<t>"?
    if model_type == "video_llava":  # no chat template on the hub: the released conversation format
        if prompt not in PROMPT_FORMATS:
            raise UserError(f"--prompt {prompt!r}: use one of {sorted(PROMPT_FORMATS)}")
        text = PROMPT_FORMATS[prompt].format(question=asked)
    else:  # the family's own chat template, the video first, as its model card asks
        conversation = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": asked}]}]
        text = processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
    # the caption's character offset: where hidden word spans of t' (footnote 2) are counted from
    return text, text.rindex(asked) + question.index("{caption}")


def answer_ids(tokenizer, prompt, answer):
    """Token ids of `answer` as it follows `prompt` in one text, found by tokenising prompt + answer,
    so it holds for any tokenizer ("▁Yes" in LLaMA, "Yes" in Qwen). "USER: ... ASSISTANT:" is
    answered " Yes"; a chat template ending in a newline, "Yes"."""
    base = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    # "ASSISTANT:" is followed by a space, a template's final newline by nothing
    full = tokenizer(prompt + ("" if prompt[-1].isspace() else " ") + answer, add_special_tokens=False)["input_ids"]
    if full[: len(base)] != base or len(full) == len(base):  # the answer must start a token of its own
        raise UserError(f"the tokenizer merges the prompt's end {prompt[-20:]!r} with the answer {answer[:20]!r}")
    return full[len(base):]


def answer_token_ids(tokenizer, prompt):
    """Ids of the first token of the answers "Yes" and "No" as they follow `prompt`."""
    ids = [answer_ids(tokenizer, prompt, answer)[0] for answer in ("Yes", "No")]
    if ids[0] == ids[1]:
        raise UserError(f"'Yes' and 'No' start with the same token {ids[0]} after {prompt[-20:]!r}")
    return ids


def prompt_tokens(processor, model_type, caption, hidden=None, prompt="llava_v1", question=QUESTION):
    """One prompt's text, its token ids (the video placeholder not expanded), each token's character
    span, and whether it is visible: False where it overlaps a hidden word span of the caption
    (hidden: [(start, end)] into `caption`, t' of footnote 2)."""
    text, start = entailment_prompt(processor, model_type, caption, prompt, question)
    enc = processor.tokenizer(text, add_special_tokens=True, return_offsets_mapping=True)  # with BOS
    spans = [(s + start, e + start) for s, e in hidden or []]  # caption offsets -> prompt offsets
    return text, enc["input_ids"], enc["offset_mapping"], token_visibility(enc["offset_mapping"], spans)


# ---- the model: loaded by hub id or folder, an optional LoRA adapter on it ------------------------
@functools.lru_cache(maxsize=None)  # one lookup per process: 01 asks for its settings, tokenizer and weights
def resolve_model(name_or_path, flag="--model"):
    """What to load for a model flag, found in seconds or refused in one line (UserError).

    A folder that exists is loaded as it is. A value that names a folder (an absolute path, ./, ../,
    ~, a second '/', or a first part that is a folder here, as in runs/tiny-model) but does not exist
    is refused. A hub id ('org/name') is looked up once, with a short timeout: a mistyped id is
    refused; with no network, or with HF_HUB_OFFLINE=1, it loads from the Hugging Face cache, or is
    refused with what to do. (transformers alone retries an unreachable hub for ~2.5 minutes.)"""
    if os.path.exists(name_or_path):
        return name_or_path
    first = name_or_path.split("/")[0]
    if name_or_path.startswith((os.sep, ".", "~")) or name_or_path.count("/") > 1 or os.path.isdir(first):
        raise UserError(f"{flag} {name_or_path}: no such folder (a hub id has the form org/name)")
    import huggingface_hub
    from huggingface_hub.constants import HF_HUB_OFFLINE
    from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError
    reason = "HF_HUB_OFFLINE=1 is set"
    if not HF_HUB_OFFLINE:
        try:  # one request, no retries: a typo or a missing network shows in seconds
            huggingface_hub.model_info(name_or_path, timeout=10)
            return name_or_path  # on the hub: transformers / diffusers download or use their cache
        except RepositoryNotFoundError:
            raise UserError(f"{flag} {name_or_path}: no such folder here and no such model on the hub "
                            f"(a typo? a private model needs `hf auth login`)") from None
        except Exception as e:  # no network, a proxy, a hub outage: try the cache
            reason = f"the hub cannot be reached ({type(e).__name__}: {str(e)[:80]})"
    try:  # a complete earlier download: load its folder, so that nothing asks the network again
        return huggingface_hub.snapshot_download(name_or_path, local_files_only=True)
    except LocalEntryNotFoundError:
        raise UserError(f"{flag} {name_or_path}: not a folder here, not in the Hugging Face cache, and "
                        f"{reason}: download it where there is a network (`hf download {name_or_path}`) "
                        f"or give its local folder") from None


def not_a_missing_backend(record):
    """A logging filter: transformers 5 says "Requested torchvision backend is not available. Falling
    back to pil backend" for a model whose image processor exists only for PIL (Video-LLaVA), although
    torchvision is installed (its video processors need it anyway): nothing is missing, so that line goes."""
    return "Falling back to pil backend" not in record.getMessage()


def load_video_llm(name_or_path=DEFAULT_MODEL, dtype=None, device="cpu"):
    """A transformers video LLM and its processor, from a hub id or a local directory, with
    shared_prefix_attention (plain sdpa wherever answer_states does not ask for it).
    dtype defaults to bfloat16 on GPU and float32 on CPU."""
    from transformers import AttentionInterface, AttentionMaskInterface, AutoModelForImageTextToText, AutoProcessor
    from transformers.masking_utils import sdpa_mask
    AttentionInterface.register("sdpa_shared_prefix", shared_prefix_attention)
    AttentionMaskInterface.register("sdpa_shared_prefix", sdpa_mask)  # 2-D masks become sdpa's masks
    name_or_path = resolve_model(name_or_path, "--model")  # a typo or no network: seconds, one line
    dtype = dtype or (torch.bfloat16 if str(device).startswith("cuda") else torch.float32)  # bf16 as in §6
    logging.getLogger("transformers.models.auto.image_processing_auto").addFilter(not_a_missing_backend)
    processor = AutoProcessor.from_pretrained(name_or_path)
    model = AutoModelForImageTextToText.from_pretrained(name_or_path, dtype=dtype,
                                                        attn_implementation="sdpa_shared_prefix")
    return model.to(device).eval(), processor


def load_adapter(model, path, base=""):
    """A LoRA adapter (03_train.py's <out_dir>/adapter) on `model` with peft, checked: every LoRA
    tensor of the file must land on a LoRA weight of the model and every LoRA weight must come from
    the file, else an error names the adapter and the base (peft itself only warns, and an adapter of
    another base model then scores as the bare base)."""
    from peft import PeftModel
    from peft.utils import load_peft_weights
    with warnings.catch_warnings():  # peft 0.21 itself reads transformers' deprecated `is_gradient_checkpointing`
        warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning)
        model = PeftModel.from_pretrained(model, path).eval()
    saved = load_peft_weights(path, device="cpu")  # the file's tensors, by their saved names
    # the loaded model's LoRA tensors under the same names (peft inserts the adapter's name, "default")
    ours = {re.sub(r"\.default(?=\.)", "", k, count=1): v for k, v in model.state_dict().items() if "lora_" in k}
    bad = sorted(set(saved) ^ set(ours)) or [k for k in saved if not torch.equal(saved[k], ours[k].cpu())]
    if bad:
        raise UserError(f"--adapter {path}: {len(bad)} LoRA tensor(s) do not fit the base model {base} (e.g. "
                         f"{bad[0]}); was it trained on another one?")
    return model


def unwrap(model):
    """The transformers model inside a (possibly PEFT- or DDP-wrapped) model."""
    model = getattr(model, "module", model)
    return model.get_base_model() if hasattr(model, "get_base_model") else model


# ---- Eq. (1) on a batch of pairs: each video's prompt prefix runs once ----------------------------
# Every prompt of a video starts with the same tokens, up to and including the video and the text
# after it that all the prompts share (the prefix: ~2,104 of Video-LLaVA-7B's ~2,127 tokens); only
# the suffix (the caption, the answer cue, teacher-forced answer tokens) differs per pair. So a row of
# the batch holds one video's prefix, then its pairs' suffixes one after another, and a 4-D attention
# mask lets each suffix token see the prefix and its own suffix only. Each pair's state is then the
# one its whole prompt would get alone (tests/test_scoring.py checks it), at a fraction of the cost.
def yes_no_logits(model, processor, videos, captions, video_index=None, hidden=None, features=None,
                  prompt="llava_v1", per_row=0):
    """The (logit_Yes, logit_No) pair of Eq. (1) for each (video, caption) pair, where the answer starts;
    alignment_logit turns them into a, alignment_score into f(V, t).

    videos:      list of uint8 frame arrays (T, H, W, 3), each encoded once and its prompt prefix run once;
    captions:    list of n captions;
    video_index: caption i is scored on videos[video_index[i]] (default: pair i with video i);
    hidden:      optional per-caption character spans hidden by the attention mask (t', Eq. 6);
    features:    optional precomputed encode_videos(...) output (LLaVA families; then `videos` is not used);
    prompt:      a PROMPT_FORMATS name (Video-LLaVA; other families use their chat template);
    per_row:     the most captions on one copy of a video's prefix (0: all; see answer_states).
    Returns a float32 tensor (n, 2) (see answer_logits); gradients flow outside torch.no_grad()."""
    hf = unwrap(model)
    states, _ = answer_states(model, processor, videos, captions, video_index, hidden, features, prompt,
                              per_row=per_row)
    # the ids of "Yes" and "No" as the answer's first token after this prompt (every pair's is the same)
    text, _ = entailment_prompt(processor, hf.config.model_type, captions[0], prompt)
    return answer_logits(model, torch.stack([s[0] for s in states]), answer_token_ids(processor.tokenizer, text))


def max_positions(model):
    """The most positions the model's LLM was trained on (its text config's max_position_embeddings;
    Video-LLaVA-7B: 4,096). A longer prompt still runs, on positions the model never saw: its scores
    would be silently wrong, so the stages leave such a pair out and name it (prompt_lengths)."""
    config = unwrap(model).config
    return getattr(getattr(config, "text_config", config), "max_position_embeddings", None) or float("inf")


def prompt_lengths(model, processor, video, captions, prompt="llava_v1", answers=None, questions=None):
    """The positions each caption's prompt takes with `video` (frames as the stage reads them): the
    prompt prefix with the video's tokens, then the caption, the answer cue and any teacher-forced
    answer tokens (answers, questions: per caption, as answer_states takes them). One encoding of
    `video`; compare with max_positions(model)."""
    hf = unwrap(model)
    head, head_text, tails, _, _ = prompt_suffixes(processor, hf, captions, None, prompt, questions, answers)
    _, _, starts, _ = video_prefixes(model, processor, [video], head, head_text)
    return [starts[0] + len(tail) for tail in tails]  # the last position used + 1


def answer_logits(model, states, token_ids):
    """The LM head's rows `token_ids` applied in float32 to final hidden states (k, hidden): (k, len).
    NOTE: not read from the bf16 logits: a bf16 logit near 20 is rounded to a multiple of 1/8, which
    would put Eq. (1)'s scores on a coarse grid (ties in retrieval rankings, steps in the losses)."""
    head = unwrap(model).lm_head
    # only the rows of the answer tokens: (len, hidden) instead of the whole vocabulary
    bias = None if head.bias is None else head.bias[token_ids].float()
    with torch.autocast(states.device.type, enabled=False):  # autocast would run it in bf16
        return F.linear(states.float(), head.weight[token_ids].float(), bias)


def answer_states(model, processor, videos, captions, video_index=None, hidden=None, features=None,
                  prompt="llava_v1", questions=None, answers=None, per_row=0):
    """Eq. (1)'s forward pass: the LM's final hidden states and logits where it predicts each
    (video, caption) pair's answer, from ONE forward in which each video's prompt prefix runs once
    (the layout above). Gradients (outside no_grad) flow through the suffixes and the prefix, with
    activation checkpointing as usual.

    videos, captions, video_index, hidden, features, prompt: as yes_no_logits;
    questions: optional per-pair question templates with one {caption} field (default QUESTION);
    answers:   optional per-pair lists of answer token ids, fed after the prompt (teacher forcing);
    per_row:   the most pairs on one row (0: all pairs of a video; each more row repeats the prefix).
    Returns (states, logits), each a tuple of n tensors with k_i = max(1, len(answers[i])) rows: row j
    is where the model predicts answer token j (row 0: the prompt's last token). states[i]: (k_i,
    hidden) in the model's dtype; logits[i]: (k_i, vocab), the LM head's output upcast to float32."""
    n, hf = len(captions), unwrap(model)
    video_index = list(range(n)) if video_index is None else list(video_index)
    # the prompts, cut after the video: one shared head (up to the video), a suffix per pair
    head, head_text, tails, shown, lengths = prompt_suffixes(processor, hf, captions, hidden, prompt, questions,
                                                             answers)
    prefix, positions, starts, encoded = video_prefixes(model, processor, videos, head, head_text, features)
    prefix, positions, starts, tails, shown = share_common_text(prefix, positions, starts, tails, shown, lengths)
    # the batch: a row per (video, up to per_row of its pairs), the prefix first, then the suffixes
    groups, ids, pos, block, first, visible, keep, order = pack_rows(
        prefix, positions, starts, tails, shown, video_index, answers, per_row, processor.tokenizer.pad_token_id or 0)
    mask, windows = suffix_masks(hf, block, first, visible, P=max(len(prefix[v]) for v, _ in groups))
    rows = [v for v, _ in groups]  # the video of each row

    def per_row_video(x):  # the vision features of each row's video, in row order
        return x[rows] if torch.is_tensor(x) else tuple(x[v] for v in rows)
    video = type(encoded)(pooler_output=per_row_video(encoded.pooler_output))
    if getattr(encoded, "deepstack_features", None) is not None:  # Qwen3-VL adds vision features in early layers
        video.deepstack_features = [per_row_video(layer) for layer in encoded.deepstack_features]
    # ---- one forward; the LM head's input at the kept positions is the answer states ----
    grabbed = []  # a forward pre-hook on lm_head sees its input: the final hidden states it is applied to
    hook = hf.lm_head.register_forward_pre_hook(lambda module, args: grabbed.append(args[0]))
    try:
        out = model(input_ids=ids.to(hf.device), attention_mask=mask.to(hf.device),
                    position_ids=pos.squeeze(0).to(hf.device), mm_encoder_outputs={"video": video},
                    logits_to_keep=keep.to(hf.device), suffix_windows=windows)
    finally:
        hook.remove()
    # the kept positions come out in row-major order (`order`); give them back in the pairs' order
    sizes = [max(1, len(answers[i])) if answers else 1 for i in order]
    states, logits = dict(zip(order, grabbed[0].split(sizes))), dict(zip(order, out.logits.float().split(sizes)))
    return tuple(states[i] for i in range(n)), tuple(logits[i] for i in range(n))


def prompt_suffixes(processor, hf, captions, hidden, prompt, questions, answers):
    """Each pair's prompt cut after its video placeholder: the head (token ids up to and including
    the placeholder, the same for every pair, and its text) and per pair the suffix's token ids, their
    visibility (False: a word of the caption hidden for t'), and the prompt's own length after the
    video. Teacher-forced answer tokens join the suffix, all but the last (predicted, never read)."""
    video_id = hf.config.video_token_id
    heads, tails, shown, lengths = {}, [], [], []
    for i, caption in enumerate(captions):
        text, ids, offsets, visible = prompt_tokens(processor, hf.config.model_type, caption,
                                                    hidden[i] if hidden else None, prompt,
                                                    questions[i] if questions else QUESTION)
        cut = len(ids) - ids[::-1].index(video_id) if video_id in ids else 0  # just after the last placeholder
        heads[tuple(ids[:cut])] = text[:offsets[cut - 1][1]] if all(visible[:cut]) else None
        fed = list(answers[i][:-1]) if answers else []  # the last answer token is predicted, never read
        tails.append(ids[cut:] + fed)
        shown.append(visible[cut:] + [True] * len(fed))  # answer tokens are always visible
        lengths.append(len(ids) - cut)  # the prompt's own tokens after the video
    if len(heads) != 1 or None in heads.values() or next(iter(heads)).count(video_id) != 1:
        raise ValueError(f"the prompts must share one prefix with one video placeholder (id {video_id}), "
                         "the caption after it")
    (head, head_text), = heads.items()
    return list(head), head_text, tails, shown, lengths


def share_common_text(prefix, positions, starts, tails, shown, lengths):
    """Move the text after the video that every prompt shares (e.g. `\\nDoes this video entail the
    description: "`) from the suffixes into each video's prefix: run once per video, not once per
    pair. Each suffix keeps at least its prompt's last token (where the answer is predicted); text
    positions go on one by one (in all d position dimensions)."""
    common_text = 0  # how many leading suffix tokens every pair shares (visible in all of them)
    while (common_text < min(lengths) - 1 and all(s[common_text] for s in shown)
           and len({t[common_text] for t in tails}) == 1):
        common_text += 1
    shared = tails[0][:common_text]
    tails, shown = [t[common_text:] for t in tails], [s[common_text:] for s in shown]
    more = [torch.arange(s, s + common_text).expand(len(p), common_text) for s, p in zip(starts, positions)]
    prefix = [torch.cat([p, torch.tensor(shared, dtype=p.dtype)]) for p in prefix]
    positions = [torch.cat([p, x], dim=1) for p, x in zip(positions, more)]  # (d, P_v + common_text)
    return prefix, positions, [s + common_text for s in starts], tails, shown


def pack_rows(prefix, positions, starts, tails, shown, video_index, answers, per_row, pad):
    """The batch's rows: [one video's prefix, padded to the longest prefix P | its pairs' suffixes,
    one after another, padded to the widest row W]. Returns the groups (video, its pairs on the row),
    and (R, W) tensors: token ids; positions (d, R, W); block (the pair a suffix token belongs to, -1
    for prefix and padding); first (the column where that suffix starts); visible (the keys a suffix
    token may see: the real prefix and its suffix's visible tokens); keep (where the LM head runs);
    and order (the pairs, in the row-major order of the kept positions)."""
    n = len(tails)
    groups = []  # (video, the pairs on this row): a video's pairs, per_row at a time
    for v in sorted(set(video_index)):
        idx = [i for i in range(n) if video_index[i] == v]
        groups += [(v, idx[j:j + (per_row or n)]) for j in range(0, len(idx), per_row or n)]
    R, P = len(groups), max(len(prefix[v]) for v, _ in groups)
    W = P + max(sum(len(tails[i]) for i in idx) for _, idx in groups)
    ids, pos = torch.full((R, W), pad), torch.zeros(len(positions[0]), R, W, dtype=torch.long)
    block, first = torch.full((R, W), -1), torch.arange(W).repeat(R, 1)
    visible, keep, order = torch.zeros(R, W, dtype=torch.bool), torch.zeros(R, W, dtype=torch.bool), []
    for r, (v, idx) in enumerate(groups):
        p, at = len(prefix[v]), P  # suffixes start at column P on every row
        ids[r, :p], pos[:, r, :p], visible[r, :p] = prefix[v], positions[v], True
        for i in idx:
            m, k = len(tails[i]), max(1, len(answers[i])) if answers else 1  # suffix length, kept positions
            ids[r, at:at + m], visible[r, at:at + m] = torch.tensor(tails[i]), torch.tensor(shown[i])
            block[r, at:at + m], first[r, at:at + m] = i, at
            # a suffix's positions go on from its video's prefix, as if its prompt ran alone
            pos[:, r, at:at + m], keep[r, at + m - k:at + m] = starts[v] + torch.arange(m), True
            order.append(i)
            at += m
    return groups, ids, pos, block, first, visible, keep, order


def suffix_masks(hf, block, first, visible, P):
    """The suffix queries' additive masks, built once (sdpa would convert a bool mask in every
    layer): a suffix token sees the real prefix and the visible tokens of its own suffix, causally.
    With shared_prefix_attention (the default): windows of SUFFIX_WINDOW queries, each with its own
    (R, 1, b - a, P + b - lo) mask, and an empty attention_mask; with sdpa or eager attention: the
    whole square (R, 1, W, W). Returns (attention_mask, windows)."""
    R, W = block.shape
    zero, low = torch.tensor([0, torch.finfo(hf.dtype).min], dtype=hf.dtype)  # additive: 0 = seen, min = not
    S = W - P  # suffix columns
    # (R, S, S): same pair, causal, and the key visible (t' hides words of the caption)
    own = (block[:, P:, None] == block[:, None, P:]) & torch.ones(S, S, dtype=torch.bool).tril() & visible[:, None, P:]
    seen = torch.where(visible[:, None, :P], zero, low)  # (R, 1, P): the prefix's real tokens
    windows = []
    if hf.config.get_text_config()._attn_implementation == "sdpa_shared_prefix":
        # shared_prefix_attention runs the prefix causally, unmasked, and each window of suffix queries
        # [a, b) against the prefix and columns [lo, b) under its own mask; attention_mask is not read
        for a in range(P, W, SUFFIX_WINDOW):
            b, lo = min(a + SUFFIX_WINDOW, W), int(first[:, a].min())
            part = torch.where(own[:, a - P:b - P, lo - P:b - P], zero, low)
            windows.append((a, b, lo, torch.cat([seen.expand(R, b - a, P), part], dim=2)[:, None].to(hf.device)))
        return torch.zeros(R, 1, 0, W, dtype=hf.dtype), windows
    # sdpa, eager: the whole square, causal over the prefix, then the suffix rows
    suffix_rows = torch.cat([seen.expand(R, S, P), torch.where(own, zero, low)], dim=2)
    mask = torch.cat([torch.where(torch.ones(P, W, dtype=torch.bool).tril(), zero, low).expand(R, P, W),
                      suffix_rows], dim=1)[:, None]
    return mask, windows


def encode_videos(model, processor, videos):
    """Vision-encode each video once -> (num_videos, L, hidden): the L embeddings that replace the
    video placeholder in the prompt. videos: list of uint8 arrays (T, H, W, 3)."""
    hf = unwrap(model)
    # the processor resizes and normalises the frames: (num_videos, T, 3, H', W')
    pixels = processor.video_processor(videos=list(videos), return_tensors="pt")["pixel_values_videos"]
    pixels = pixels.to(hf.device, hf.dtype)
    features = hf.model.get_video_features(pixel_values_videos=pixels).pooler_output  # projected into the LM
    return features.reshape(len(videos), -1, features.shape[-1])


def video_prefixes(model, processor, videos, head, head_text, features=None):
    """Each video's prompt prefix (`head`: the prompt's token ids up to its video placeholder, whose
    text is head_text), the placeholder expanded. Per video: token ids (P_v,) and positions (d, P_v)
    (d = 3: Qwen-VL's 3-D rotary positions, from its own get_rope_index; else d = 1), and the position
    where the text after the video goes on; then the vision encoder's output (frozen: no_grad)."""
    hf = unwrap(model)
    if not hasattr(hf.model, "get_rope_index"):  # LLaVA families: L tokens per video, 1-D positions
        from transformers.modeling_outputs import BaseModelOutputWithPooling
        if features is None:
            with torch.no_grad():
                features = encode_videos(model, processor, videos)
        ids = torch.tensor(head)
        # the placeholder becomes L video tokens (Video-LLaVA-7B: 8 frames x 257 = 2,056)
        ids = ids.repeat_interleave(torch.where(ids == hf.config.video_token_id, features.shape[1], 1))
        n = len(features)
        encoded = BaseModelOutputWithPooling(pooler_output=features)
        # every video's prefix has the same ids and positions 0..P-1; the text goes on at P
        return [ids] * n, [torch.arange(len(ids))[None]] * n, [len(ids)] * n, encoded
    # Qwen-VL: the processor expands the placeholder (a size-dependent count; Qwen3-VL adds timestamps);
    # get_rope_index of the prefix plus one text token gives its positions and where the text goes on
    with torch.no_grad():
        enc = [processor(text=head_text, videos=[v], return_tensors="pt") for v in videos]
        pixels, grids = (torch.cat([e[k] for e in enc]).to(hf.device) for k in ("pixel_values_videos",
                                                                                "video_grid_thw"))
        encoded = hf.model.get_video_features(pixels.to(hf.dtype), grids, return_dict=True)
    ids, positions, starts = [], [], []
    for e in enc:  # one video at a time: its own placeholder count and 3-D positions
        extra = {k: e[k] for k in ("video_grid_thw", "second_per_grid_ts") if k in e}
        pos, _ = hf.model.get_rope_index(F.pad(e["input_ids"], (0, 1)), F.pad(e["mm_token_type_ids"], (0, 1)), **extra)
        ids.append(e["input_ids"][0])
        positions.append(pos[:, 0, :-1])  # (3, P_v): the prefix's own positions
        starts.append(int(pos[0, 0, -1]))  # the position of the first text token after the prefix
    return ids, positions, starts, encoded


SUFFIX_WINDOW = 256  # suffix queries per attention call in shared_prefix_attention


def shared_prefix_attention(module, query, key, value, attention_mask, suffix_windows=(), **kwargs):
    """sdpa, except on answer_states' rows [prefix | suffixes] (suffix_windows given): there the prefix
    (columns < P) attends causally to itself through sdpa's causal kernel, unmasked, and the suffix
    queries go in windows of columns [a, b), each to the prefix and to columns [lo, b) (lo: where the
    window's first suffix starts) under the window's own mask (rows, 1, b - a, P + b - lo), built once
    by answer_states (attention_mask is then not read). The same numbers as sdpa with the whole
    square mask, at a fraction of the cost: sdpa computes masked-out scores too."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward as sdpa
    if not suffix_windows:
        return sdpa(module, query, key, value, attention_mask, **kwargs)
    P = suffix_windows[0][0]  # the first window starts where the prefix ends
    # the prefix: plain causal attention over itself (no mask tensor: sdpa's fast causal kernel)
    out = [sdpa(module, query[:, :, :P], key[:, :, :P], value[:, :, :P], None, is_causal=True, **kwargs)[0]]
    for a, b, lo, mask in suffix_windows:
        # the window's keys: the prefix, then columns [lo, b) (batch, heads, keys, dim); where the window's
        # first suffix starts right after the prefix (lo == P: the first window, in 03 usually the only
        # one) they are columns [0, b), a view: no copy of the keys and values, nor of their gradients
        k, v = (x[:, :, :b] if lo == P else torch.cat([x[:, :, :P], x[:, :, lo:b]], dim=2) for x in (key, value))
        out.append(sdpa(module, query[:, :, a:b], k, v, mask, **kwargs)[0])
    return torch.cat(out, dim=1), None  # (batch, length, heads, head_dim)


# =================================================================================================
# Part 3: plumbing (a first reader may skip it): torchrun, seeds, printing, flags, files, videos
# =================================================================================================

# ---- a user's mistake: one line and exit status 2, no traceback ---------------------------------
class UserError(ValueError):
    """A mistake in what the user gave (a flag, a file, a row, a full disk): the stage stops with
    `error: <file>:<line>: <problem>` on stderr and exit status 2 (argparse's convention). Bugs keep
    their tracebacks."""


def run_stage(main, args_class):
    """A stage's entry point: parse the flags (choices checked before any work), run main(args), and
    turn a UserError into one line on stderr and exit status 2."""
    try:
        main(parse_args(args_class))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)


# ---- torchrun, seeds, printing, flags -----------------------------------------------------------
@dataclass
class Dist:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: str = "cpu"
    master: bool = True  # rank 0 prints, merges and saves


def setup_distributed():
    """Read torchrun's RANK / LOCAL_RANK / WORLD_SIZE; nccl on GPU, gloo on CPU. Plain `python`
    (no RANK) gives a single process and no process group."""
    cuda = torch.cuda.is_available()
    if "RANK" not in os.environ:  # plain `python`: one process, no process group
        return Dist(device="cuda" if cuda else "cpu")
    rank, local_rank, world = (int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
    if cuda:
        torch.cuda.set_device(local_rank)  # one GPU per process, by its rank on this node
    # NOTE: these torch modules take the WORLD group as a default argument when first imported
    # (transformers imports them). Imported after init_process_group, they keep the group alive past
    # destroy_process_group, and its gloo threads ran on into interpreter exit, where a rank could abort
    # ("terminate called without an active exception"). Imported before, those defaults are None.
    import importlib
    for name in ("torch.distributed.fsdp.sharded_grad_scaler", "torch.distributed.nn.functional",
                 "torch.distributed.optim"):
        importlib.import_module(name)
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend="nccl" if cuda else "gloo")
    return Dist(rank, local_rank, world, f"cuda:{local_rank}" if cuda else "cpu", rank == 0)


def plural(n, noun):
    """'1 row', '2 rows', '1 process', '2 processes': a count and its noun."""
    return f"{n} {noun}" + ("" if n == 1 else "es" if noun.endswith(("s", "sh", "ch", "x")) else "s")


def print0(*args, **kwargs):
    """print() on rank 0 only."""
    if int(os.environ.get("RANK", 0)) == 0:
        print(*args, **kwargs, flush=True)


def seed_everything(seed):
    """Seed python, numpy and torch (all devices)."""
    import random
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # the CPU's and every GPU's generator


def example_seed(*key, base=0):
    """A seed derived from an example's identity (e.g. its video path and caption), not from its
    position in a shard, so outputs do not depend on the number of GPUs or the order of work."""
    digest = hashlib.sha256("\x1f".join(map(str, (base, *key))).encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def shard(items, dist):
    """This rank's share of a list: items[rank::world_size] (rank 0 alone gets everything)."""
    return items[dist.rank :: dist.world_size]


def progress(iterable, total=None, desc=""):
    """A tqdm progress bar (rows/s and ETA) on rank 0; the plain iterable on other ranks."""
    if int(os.environ.get("RANK", 0)) != 0:
        return iterable
    from tqdm import tqdm
    # redirected to a file (a log, CI): a line every 10 s instead of every update
    return tqdm(iterable, total=total, desc=desc, dynamic_ncols=True, mininterval=0.1 if sys.stderr.isatty() else 10)


def wait_for_files(paths, every=2.0):
    """Rank 0 waits until every path exists (the other ranks' outputs, or their "finished" markers).

    NOTE: it polls the file system instead of calling a barrier: a collective times out (NCCL's
    default is 10 minutes) while another rank still works on its last items. If a rank dies,
    torchrun stops this one too."""
    import time
    pending, wait = list(paths), 0.05
    while pending:
        pending = [p for p in pending if not os.path.exists(p)]
        if pending:  # looked at again soon, then less and less often, at most every `every` seconds
            time.sleep(wait)
            wait = min(2 * wait, every)


def parse_args(cls, argv=None):
    """Command-line flags from an `Args` dataclass: one `--field` per field, its type from the
    annotation, its --help from the docstring written under the field (as in CleanRL). A field typed
    Literal[...] (or list[Literal[...]]) takes only those values: argparse refuses any other before
    the stage does any work, and --help lists them."""
    import argparse
    import ast
    import dataclasses
    import inspect
    import textwrap
    import typing
    # the string under each field of the dataclass is its --help (the AST sees it; Python drops it)
    body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body
    docs = {a.target.id: b.value.value for a, b in zip(body, body[1:])
            if isinstance(a, ast.AnnAssign) and isinstance(b, ast.Expr) and isinstance(b.value, ast.Constant)}
    parser = argparse.ArgumentParser(description=inspect.getdoc(inspect.getmodule(cls)),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        many = isinstance(default, (list, tuple))  # --flag a b c
        shown = " ".join(map(str, default)) if many else default
        kw = dict(default=default, help=docs.get(f.name, "") + (f" (default: {shown})" if shown != "" else ""))
        kind = typing.get_args(f.type)[0] if many and typing.get_args(f.type) else f.type  # list[X]: X
        if typing.get_origin(kind) is typing.Literal:  # the values it takes, checked by argparse
            kw["choices"] = typing.get_args(kind)
            kind = type(kw["choices"][0])
        elif not isinstance(kind, type) or many:
            kind = type(default[0]) if many and default else str
        if kind is bool:  # --flag / --no-flag
            parser.add_argument(f"--{f.name}", action=argparse.BooleanOptionalAction, **kw)
        else:
            parser.add_argument(f"--{f.name}", type=kind, **({"nargs": "*"} if many else {}), **kw)
    return cls(**vars(parser.parse_args(argv)))


# ---- files: CSV in, atomic writes out, settings-checked resume ----------------------------------
class Rows(list):
    """read_csv's rows (dicts), with `lines` (each row's physical line in the file; the header is
    line 1) and `skipped` ({problem: [lines]}, the rows left out)."""

    def where(self, wanted):
        """The rows for which wanted(line, row) is true, each still beside its line; the same `skipped`."""
        keep = [wanted(line, r) for line, r in zip(self.lines, self)]
        kept = Rows(r for r, k in zip(self, keep) if k)
        kept.lines, kept.skipped = [line for line, k in zip(self.lines, keep) if k], self.skipped
        return kept


def read_csv(path, required=(), texts=()):
    """The one reader of every stage's input CSV: rows as dicts, checked, with physical line numbers.

    - a missing file or column, a byte that is not UTF-8, or a header with no row: an error naming
      the file (and the line of the bad byte);
    - a row with more or fewer fields than the header, or an empty `texts` column: skipped, named
      by file:line and counted (Rows.skipped);
    - an exact duplicate of an earlier row: dropped, named and counted (the same row twice would be
      generated, weighted, trained on or scored twice).
    Lines are the file's physical lines, so a quoted caption that spans lines moves the next row's
    number as an editor shows it. Blank lines are ignored."""
    if not os.path.exists(path):
        raise UserError(f"{path}: no such CSV file")
    data = open(path, "rb").read()
    try:
        text = data.decode("utf-8-sig")  # a BOM (a spreadsheet's export) is not part of the header
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1  # the physical line of the first bad byte
        raise UserError(f"{path}:{line}: byte 0x{data[e.start]:02x} is not UTF-8; save the file as UTF-8") from None
    reader = csv.reader(io.StringIO(text, newline=""))  # newline="": quoted captions may span lines
    header = next(reader, None)
    missing = [c for c in required if c not in (header or [])]
    if missing:
        raise UserError(f"{path}: missing column(s) {missing}; found {header}")
    rows, seen, skipped = Rows(), {}, {}
    rows.lines, rows.skipped = [], skipped
    start = reader.line_num + 1  # the physical line where the next record starts
    for fields in reader:
        line, start = start, reader.line_num + 1
        if not fields:
            continue  # a blank line
        # the first problem of a row decides how it is counted
        if len(fields) != len(header):
            kind = f"not {len(header)} fields as in the header"
        elif empty := [c for c in texts if not fields[header.index(c)].strip()]:
            kind = "empty " + " and ".join(empty)
        elif tuple(fields) in seen:
            kind = "exact duplicate of an earlier row"
        else:  # a good row
            seen[tuple(fields)] = line
            rows.append(dict(zip(header, fields)))
            rows.lines.append(line)
            continue
        skipped.setdefault(kind, []).append(line)
    for kind, lines in skipped.items():  # one message per kind of bad row
        print0(f"{path}: {len(lines)} row(s) skipped, {kind}: line(s) {', '.join(map(str, lines[:20]))}"
               + (", ..." if len(lines) > 20 else ""))
    if not rows:
        raise UserError(f"{path}: no usable row" + (f" ({sum(map(len, skipped.values()))} skipped)" if skipped else
                                                     " (only a header)" if header else " (empty file)"))
    return rows


def keep_split(rows, split, path):
    """read_csv's rows of one `split` (e.g. VideoCon's "train"): a model is never weighted or trained
    on the rows it is evaluated on. Values are compared without case or surrounding spaces; a file
    without a `split` column, or split "", keeps every row. The rows left out are counted in one
    printed line; none left is an error naming the file's splits."""
    def wanted(row):  # a row without the column belongs to every split
        return row.get("split", split).strip().lower() == split.strip().lower()
    if not split or all(map(wanted, rows)):
        return rows
    kept = rows.where(lambda _, row: wanted(row))
    splits = sorted({r.get("split", "") for r in rows})
    if not kept:
        raise UserError(f"{path}: no row of --split {split!r}; its splits: {splits}")
    print0(f"{path}: {len(rows) - len(kept)} row(s) of other splits left out (--split {split!r}; its splits: {splits})")
    return kept


WRITE_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG}
# how torch.save's zip writer and safetensors say that the disk is full (no errno to read)
FULL_DISK_WORDS = ("inline_container", "PytorchStreamWriter", "No space left")


@contextlib.contextmanager
def naming_write_errors(path):
    """A write to `path` that fails for want of room or permission (a full disk, a read-only folder)
    stops with a UserError naming the file, which write() itself does not; other errors pass on."""
    try:
        yield
    except OSError as e:
        if e.errno not in WRITE_ERRORS:
            raise
        raise UserError(f"{path}: cannot write it: {e.strerror}") from e
    except Exception as e:  # torch.save's RuntimeError, safetensors' SafetensorError
        if not any(word in str(e) for word in FULL_DISK_WORDS):
            raise
        raise UserError(f"{path}: cannot write it (is the disk full?)") from e


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary name next to `path`; rename it to `path` only if the block succeeds, so
    a killed run never leaves a truncated file under the final name. The block may write a file or
    a folder there (a folder replaces the old one). A write that fails names the file."""
    root, ext = os.path.splitext(path)
    tmp = f"{root}.tmp{os.getpid()}{ext}"  # keep the extension: writers pick the format by it
    try:
        with naming_write_errors(path):
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            yield tmp
            if os.path.isdir(tmp) and os.path.isdir(path):  # a folder (an adapter): the old one goes
                shutil.rmtree(path)  # a crash here leaves no folder, never half of one
            os.replace(tmp, path)
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp)
        elif os.path.exists(tmp):
            os.remove(tmp)


def write_csv(path, rows, fieldnames=None):
    """Write rows (dicts) atomically; columns default to the union of keys in first-seen order."""
    fieldnames = fieldnames or list(dict.fromkeys(k for r in rows for k in r))
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=fieldnames)
        writer.writeheader()
        writer.writerows(rows)


def save_json(path, obj):
    """Write JSON atomically (e.g. the settings a stage ran with, next to its outputs)."""
    import json
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        json.dump(obj, fh, indent=2, default=str)


def file_hash(path):
    """sha256 of a file's bytes (the content of an input, for a settings-checked resume)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):  # 1 MiB at a time: CSVs of any size
            digest.update(block)
    return digest.hexdigest()


def settings_diff(old, new):
    """'key: old then, new now; ...' for every key whose value differs ('' if none does)."""
    return "; ".join(f"{k}: {old.get(k)!r} then, {new.get(k)!r} now" for k in sorted(set(old) | set(new))
                     if old.get(k) != new.get(k))


def check_resume(path, record, dist=None):
    """Settings-checked resume. `record` (the inputs' content hashes and every setting that changes
    the results) describes the work kept next to `path`: the first run writes it there (rank 0), a
    rerun with the same record continues that work, and a rerun with another one stops, naming each
    setting that differs, before it deletes or reuses anything."""
    import json
    record = json.loads(json.dumps(record, default=str))  # as it reads back (tuples -> lists, ...)
    if os.path.exists(path):  # a rerun: its settings must be the first run's
        with open(path, encoding="utf-8") as fh:
            old = json.load(fh)
        if differ := settings_diff(old, record):
            raise UserError(f"{path}: the work here was made with other settings ({differ}); "
                             f"rerun with the same settings to resume, or pass another output folder "
                             f"(or delete this one) to start again")
    elif dist is None or dist.master:  # the first run records what its work is made of
        save_json(path, record)


# ---- videos: decord reads, x264 writes (byte-stable) --------------------------------------------
def frame_indices(num_total, num_frames, sampling="uniform"):
    """Which frames to keep. "uniform": np.linspace over the clip, truncated to integers, as the
    released Video-LLaVA code and the transformers model card do; "middle": the middle frame of each
    of num_frames equal segments (VideoCon / mPLUG-Owl)."""
    if sampling == "uniform":
        return np.linspace(0, num_total - 1, num_frames, dtype=int)
    if sampling == "middle":
        edges = np.linspace(0, num_total, num_frames + 1)
        return np.minimum(((edges[:-1] + edges[1:]) / 2).astype(int), num_total - 1)
    raise UserError(f"unknown frame sampling {sampling!r}: use 'uniform' or 'middle'")


def read_video(path, num_frames=8, sampling="uniform"):
    """Decode `num_frames` frames with decord -> uint8 array (num_frames, H, W, 3).

    Raises FileNotFoundError / ValueError naming the file if it is missing, unreadable or empty.
    (decord 0.6 cannot read back some tiny widths, e.g. 16/24/48/72 px; real video sizes are fine.)"""
    import decord
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: video file not found")
    try:
        vr = decord.VideoReader(path, num_threads=1)  # one thread: the stages parallelise over videos
        n = len(vr)  # frames in the file
        if n == 0:
            raise ValueError("no frames")
        return vr.get_batch(list(frame_indices(n, num_frames, sampling))).asnumpy()
    except Exception as e:  # decord raises its own DECORDError; name the file in every case
        raise ValueError(f"{path}: cannot decode video ({type(e).__name__}: {e})") from e


def rgb_to_yuv420(frames):
    """uint8 RGB frames (T, H, W, 3), H and W even -> the yuv420p planes as PyAV takes them, one
    (H * 3 / 2, W) array a frame: Y, then U, then V (BT.601, limited range, the colours that
    decoders assume for an untagged SD video). Integer arithmetic only, so the same frames give
    the same planes on every machine (libswscale picks a SIMD path by CPU; its paths need not agree)."""
    r, g, b = (frames[..., c].astype(np.int32) for c in range(3))
    y = ((66 * r + 129 * g + 25 * b + 128) >> 8) + 16  # the classic 8-bit BT.601 coefficients
    t, h, w = y.shape

    def chroma(k_r, k_g, k_b):  # one chroma sample per 2x2 block: the sum of 4 pixels, rounded once
        c = (k_r * r + k_g * g + k_b * b).reshape(t, h // 2, 2, w // 2, 2).sum(axis=(2, 4))
        return ((c + 512) >> 10) + 128
    u, v = chroma(-38, -74, 112), chroma(112, -94, -18)
    planes = [y.reshape(t, -1), u.reshape(t, -1), v.reshape(t, -1)]
    return np.concatenate(planes, axis=1).reshape(t, h * 3 // 2, w).clip(0, 255).astype(np.uint8)


# x264's settings for every video we write. NOTE (deviation from x264's defaults): the same frames
# must give the same bytes, whatever the machine, the process, or what ran in it before. With
# x264's defaults they did not: the thread count follows the CPU count and changes the bitstream,
# and at the toy world's 32x32 and 64x32 an AVX-512 machine wrote other bytes once torch had run in
# the process. So: one thread; x264's plain C code (asm=0), the same instructions on every x86_64
# CPU; and no weighted prediction (weightp=0, and psy=0, without which x264 still runs a "fake" one):
# its C code reads uninitialised padding of x264's frames, as valgrind shows (psy's tuning is for
# human eyes anyway). Cost: ~5 s per 720x480x49 video on one core (0.7 s with the defaults), which
# 01_generate.py hides behind the next video's generation.
X264_PARAMS = "threads=1:asm=0:weightp=0:psy=0"


def tag_bt601(codec):
    """Tag a video as BT.601 (SMPTE 170M), limited range: what rgb_to_yuv420 writes, and what a
    player would otherwise guess for SD sizes only (browsers take untagged HD video as BT.709)."""
    from av.video.reformatter import ColorPrimaries, ColorRange, Colorspace, ColorTrc
    codec.colorspace = Colorspace.ITU601  # the BT.601 matrix (FFmpeg's BT470BG = SMPTE170M's)
    codec.color_primaries, codec.color_trc = ColorPrimaries.SMPTE170M, ColorTrc.SMPTE170M
    codec.color_range = ColorRange.MPEG  # limited range: Y in 16..235


def write_video(path, frames, fps=8):
    """Write uint8 frames (T, H, W, 3) as H.264 mp4 (x264 at its default CRF 23), atomically; the
    same frames give the same file, byte for byte. Odd sizes are cropped to even."""
    import av
    # yuv420p halves the chroma in both directions: H.264 in this format needs even sizes
    frames = np.asarray(frames)[:, : frames.shape[1] // 2 * 2, : frames.shape[2] // 2 * 2]
    with atomic_path(path) as tmp:  # a killed run leaves a *.tmp<pid>.mp4, never a truncated final file
        with av.open(tmp, "w") as container:
            stream = container.add_stream("libx264", rate=fps, options={"x264-params": X264_PARAMS})
            stream.thread_count, stream.thread_type = 1, "NONE"  # no FFmpeg-side threads either
            stream.height, stream.width = frames.shape[1:3]
            stream.pix_fmt = "yuv420p"
            tag_bt601(stream.codec_context)  # say which colours rgb_to_yuv420 wrote
            for planes in rgb_to_yuv420(frames):  # already yuv420p: PyAV hands them to x264 as they are
                container.mux(stream.encode(av.VideoFrame.from_ndarray(planes, format="yuv420p")))
            container.mux(stream.encode())  # flush
