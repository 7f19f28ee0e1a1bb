"""Eq. (1)'s forward pass, fast: the LM's states where it predicts each (video, caption) pair's
answer, from one forward in which each video's prompt prefix runs once for all of its captions.
common.plain_answer_logits is the definition (one whole prompt a pair); tests/test_scoring.py checks
that this path gives its scores and gradients for four model families."""
import torch
import torch.nn.functional as F

from common import QUESTION, answer_token_ids, entailment_prompt, prompt_tokens
from synvita.video_llm import unwrap


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
