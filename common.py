"""The paper's mathematics (Zanella et al., "Can Text-to-Video Generation help Video-Language
Alignment?", CVPR 2025), to be read beside §3-§5, in three parts:

Part 1, the equations: one small pure function per equation (Eqs. 1-7, Table 4, footnote 2),
        tensors in and tensors out, the formula in its docstring;
Part 2, the question f(V, t) answers: VideoCon's entailment prompt and the answer tokens Eq. (1)
        reads;
Part 3, f(V, t) by definition: one whole prompt, one forward, on any video LLM object.

Only torch, numpy and the standard library: the machinery that runs the stages (loading models, the
fast forward, files, torchrun) is in the synvita/ package.
"""
import re

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
# Part 2: the question f(V, t) answers (§3: the model is asked the entailment question, Eq. 1 reads its answer)
# =================================================================================================
class UserError(ValueError):
    """A mistake in what the user gave (a flag, a file, a row, a full disk): the stage stops with
    `error: <file>:<line>: <problem>` on stderr and exit status 2 (argparse's convention). Bugs keep
    their tracebacks."""


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
# mPLUG-Owl (VideoCon's Owl-Con): its conversation, as VideoCon's eval CSVs store it in `caption`
OWL_PROMPT = ("The following is a conversation between a curious human and AI assistant. The assistant gives "
              "helpful, detailed, and polite answers to the user's questions.\nHuman: <|video|>\nHuman: {question}\nAI: ")


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
    elif model_type == "mplug-owl":  # VideoCon's conversation; the answer follows "AI: "
        text = OWL_PROMPT.format(question=asked)
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


# =================================================================================================
# Part 3: f(V, t) by definition, one whole prompt and one forward a pair
# =================================================================================================
def plain_answer_logits(model, processor, video, caption, hidden=None, question=QUESTION, answer=()):
    """Eq. (1)'s forward by definition: the processor builds the pair's whole prompt (the video
    placeholder expanded), one sequence runs through the model, and the logits are read where it
    predicts the answer. t' (footnote 2): the attention to the caption's hidden words is zeroed.
    Any transformers video LLM (model, processor); Qwen-VL's 3-D positions from its get_rope_index.

    video: uint8 frames (T, H, W, 3); caption: t; hidden: [(start, end)] word spans of `caption` to
    hide (hidden_word_spans); question: the template asked; answer: token ids fed after the prompt.
    Returns the float32 logits (k, vocab) where the model predicts the answer's k = max(1, len(answer))
    tokens; row 0 at the prompt's last token gives a = logit_Yes - logit_No (alignment_logit). The
    stages run the same numbers faster (synvita/shared_prefix.py), one prompt prefix per video."""
    text, start = entailment_prompt(processor, model.config.model_type, caption, question=question)
    inputs = processor(text=text, videos=[video], return_tensors="pt")
    enc = processor.tokenizer(text, return_offsets_mapping=True)
    after = enc["input_ids"][::-1].index(model.config.video_token_id)  # the tokens after the video placeholder
    if inputs["input_ids"][0, -after:].tolist() != enc["input_ids"][-after:]:  # where t' is counted from
        raise ValueError("the processor's prompt does not end as the tokenizer's: t' cannot be placed")
    spans = [(s + start, e + start) for s, e in hidden or []]  # caption offsets -> prompt offsets
    visible = torch.tensor(token_visibility(enc["offset_mapping"][-after:], spans), dtype=torch.long)
    inputs["attention_mask"][0, -after:] *= visible  # t': its hidden words take no attention
    fed = torch.tensor([list(answer)], dtype=torch.long)  # teacher-forced answer tokens, seen by all
    for key in ("input_ids", "attention_mask", "mm_token_type_ids"):
        if key in inputs:
            extra = fed if key == "input_ids" else torch.ones_like(fed) * (key == "attention_mask")
            inputs[key] = torch.cat([inputs[key], extra], 1)
    if hasattr(model.model, "get_rope_index"):  # Qwen-VL: 3-D rotary positions, as its generate() computes them
        grids = {k: inputs[k] for k in ("video_grid_thw", "second_per_grid_ts") if k in inputs}
        inputs["position_ids"], _ = model.model.get_rope_index(inputs["input_ids"], inputs["mm_token_type_ids"], **grids)
    logits = model(**inputs.to(model.device)).logits[0].float()  # (length, vocab)
    end = logits.shape[0] - len(answer)  # the position after the prompt's last token
    return logits[end - 1:end - 1 + max(1, len(answer))]
