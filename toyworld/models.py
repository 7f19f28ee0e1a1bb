"""The toy world's models and their pretraining: a tiny Video-LLaVA (the base f of 03/04) and three
tiny LLaVA-1.5 image models (02's VQA ensemble), pretrained from scratch on real toy clips and saved
like hub checkpoints (model + processor), so the stages load them by path.

The base is pretrained like a generic video LLM: it captions clips (a language-model loss on every
caption) and learns, word by word, where a caption stops being true of the clip (the dense prefix
loss, on negatives of colour, shape, count, relation and a thing that is not there: BASE_TYPES), but
it is never asked the entailment question (`ask=False`: no Eq. 2 and no loss after the caption), as
Video-LLaVA was never trained on VideoCon's question. So its zero-shot answer is weak, and VideoCon-style
fine-tuning has something to teach (paper Table 3: zero-shot 62.98 -> VideoCon 85.86 AUC); what the
answer learns about "up"/"down" it learns there, from text that names them only in negatives (the
bias of Fig. 1). Measured (README): its caption LM names a single mover's direction (`direction_naming`)
and its answer is at chance on direction edits. `pretrain(direction_weight=...)` weights the
caption LM's direction words (README: bases tried).
The VQA members see one frame and are pretrained on all seven types, direction edits 4 times as
often and direction words counted 5 times (VQA_TYPES, VQA_DIRECTION_WEIGHT): they read a mover's
direction from its nose and cannot learn event order (paper Fig. 2); weighted alike, they did not
learn the nose (README: "The toy models").

Pretrain all four anew into another folder (seeded; README has the times), then use them:
    python -m toyworld.run --models runs/pretrained --seeds
    python -m toyworld.run --models runs/pretrained --out_dir runs/toy-mine
"""
import functools
import os
import random

import numpy as np

from common import SYSTEM
from toyworld.world import (COLOURS, COUNTS, FRAMES, MOTIONS, PROMPT, SHAPES, SIZE, TYPES, caption, negative, negative_types,
                            random_scene, render, write_clip)

PROMPT_WORDS = [*SYSTEM.replace(".", " . ").replace(",", " , ").replace("'", " ' ").split(),
                "USER", ":", "ASSISTANT", "Does", "this", "video", "figure", "show", "entail", "the", "description",
                '"', "?", "Please", "answer", "yes", "or", "no", ".", "Yes", "No", ","]
BASE_TYPES = ("attribute", "object", "count", "relation", "hallucination")  # what one frame shows
BASE_SIZES = dict(text_layers=4, vision_layers=3, patch=16, vision_hidden=128)
# the toy VQA ensemble of 02 (fbar): three frame models that differ in depth, width and seed
# their hard negatives: all seven types, direction edits 4 times as often, and direction words count 5
# times in their caption LM: with fewer, a member does not learn to read a mover's nose (README)
VQA_TYPES = {**dict.fromkeys(TYPES, 1), "action": 4}
VQA_DIRECTION_WEIGHT = 5.0
VQA_MEMBERS = [dict(text_layers=3, vision_layers=3, seed=1), dict(text_layers=4, vision_layers=3, seed=2),
               dict(hidden=96, text_layers=3, vision_layers=3, seed=3)]


def toy_vocabulary():
    words = [*PROMPT_WORDS, *COUNTS.values(), *COLOURS, *SHAPES, *(s + "s" for s in SHAPES), *MOTIONS,
             "moves", "move", "then", "above", "below"]
    return list(dict.fromkeys(words))


def build_tokenizer():
    """A word-level tokenizer over the toy world's closed vocabulary (punctuation split off)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast
    special = ["<unk>", "<s>", "</s>", "<pad>", "<video>", "<image>"]
    vocab = {w: i for i, w in enumerate(special + toy_vocabulary())}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok.add_special_tokens(special)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>", extra_special_tokens={"video_token": "<video>", "image_token": "<image>"})


def clip_llama_configs(tokenizer, size=SIZE, patch=8, hidden=64, text_layers=3, vision_layers=2, vision_hidden=None):
    """The configs of a toy CLIP vision tower (width vision_hidden, default hidden) and LLaMA
    language model (width hidden) for size x size frames: the two halves of a toy (Video-)LLaVA."""
    from transformers import CLIPVisionConfig, LlamaConfig
    vision_hidden = vision_hidden or hidden
    vision = CLIPVisionConfig(hidden_size=vision_hidden, intermediate_size=2 * vision_hidden, num_hidden_layers=vision_layers,
                              num_attention_heads=2, image_size=size, patch_size=patch)
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                       num_hidden_layers=text_layers, num_attention_heads=4, num_key_value_heads=4,
                       max_position_embeddings=1024, pad_token_id=tokenizer.pad_token_id,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    return vision, text


def new_video_llava(tokenizer, size=SIZE, patch=8, seed=0, **sizes):
    """A randomly initialised Video-LLaVA at toy size and its processor, for size x size frames.
    sizes: hidden, text_layers, vision_layers, vision_hidden (see clip_llama_configs)."""
    import torch
    from transformers import (VideoLlavaConfig, VideoLlavaForConditionalGeneration, VideoLlavaImageProcessor,
                              VideoLlavaProcessor, VideoLlavaVideoProcessor)
    torch.manual_seed(seed)
    vision, text = clip_llama_configs(tokenizer, size, patch, **sizes)
    config = VideoLlavaConfig(vision_config=vision, text_config=text, vision_feature_layer=-2,
                              video_token_id=tokenizer.convert_tokens_to_ids("<video>"),
                              image_token_id=tokenizer.convert_tokens_to_ids("<image>"))
    resize, crop = {"shortest_edge": size}, {"height": size, "width": size}
    processor = VideoLlavaProcessor(VideoLlavaImageProcessor(size=resize, crop_size=crop),
                                    VideoLlavaVideoProcessor(size=resize, crop_size=crop), tokenizer, patch_size=patch)
    return VideoLlavaForConditionalGeneration(config).eval(), processor


def new_llava(tokenizer, size=SIZE, patch=8, seed=0, **sizes):
    """A randomly initialised LLaVA-1.5 at toy size (an IMAGE model, for 02_weight.py's VQA
    ensemble) and its processor, with llava-1.5's chat template "USER: <image>\\n... ASSISTANT:"."""
    import torch
    from transformers import CLIPImageProcessor, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor
    torch.manual_seed(seed)
    vision, text = clip_llama_configs(tokenizer, size, patch, **sizes)
    config = LlavaConfig(vision_config=vision, text_config=text, vision_feature_layer=-2,
                         vision_feature_select_strategy="default", image_token_id=tokenizer.convert_tokens_to_ids("<image>"))
    image_processor = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=patch,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1,
                               chat_template=LLAVA_TEMPLATE)
    return LlavaForConditionalGeneration(config).eval(), processor


# the shape of llava-hf/llava-1.5-7b-hf's chat template: "USER: <image>\n<text> ASSISTANT:"
LLAVA_TEMPLATE = (
    "{% for m in messages %}{{ m['role'].upper() + ': ' }}"
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}{{ '<image>\n' }}{% endif %}{% endfor %}"
    "{% for c in m['content'] %}{% if c['type'] == 'text' %}{{ c['text'] + ' ' }}{% endif %}{% endfor %}"
    "{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}")
VQA_QUESTION = 'Does this figure show "{caption}"? Please answer yes or no.'  # 02_weight.py's question


# ---- pretraining data: real clips, written to mp4 and decoded, as the stages will see them -------
def clip_pool(root, n, seed):
    """n real clips (scenes of random_scene) written under root and decoded again with the stages'
    reader (H.264 changes the pixels a little) -> (scenes, uint8 array (n, FRAMES, SIZE, SIZE, 3))."""
    from synvita.video_io import read_video
    rng = random.Random(seed)
    scenes = [random_scene(rng) for _ in range(n)]
    paths = [write_clip(root, f"pool_{i:05d}", s, rng.randrange(2**31)) for i, s in enumerate(scenes)]
    return scenes, np.stack([read_video(os.path.join(root, p), FRAMES) for p in paths])


def pretraining_batch(scenes, clips, rng, n, easy, types=TYPES):
    """n pool clips with their caption and a negative each: with probability `easy` (or when none
    of `types` applies) the caption of another random scene (an easy negative), else a minimal edit
    of an applicable type among `types` (a list, or {type: relative frequency})."""
    weights = types if isinstance(types, dict) else dict.fromkeys(types, 1)
    idx = [rng.randrange(len(scenes)) for _ in range(n)]
    pos, neg = [caption(scenes[i]) for i in idx], []
    for i in idx:
        kinds = [k for k in negative_types(scenes[i]) if weights.get(k)]
        hard = kinds and rng.random() >= easy
        kind = hard and rng.choices(kinds, [weights[k] for k in kinds])[0]
        neg.append(caption(negative(scenes[i], kind, rng) if hard else random_scene(rng)))
    return clips[idx], pos, neg


def build_text_batch(model, processor, captions, num_video_tokens, hidden=None, prompt="llava_v1"):
    """Token ids of whole entailment prompts, one per row, the video placeholder expanded to
    num_video_tokens, left-padded so that the answer position is the last one for every row (a plain
    full forward, for pretraining; the stages score with shared_prefix.answer_states).
    Returns input_ids, attention_mask, position_ids, (yes, no)."""
    import torch
    from common import answer_token_ids, prompt_tokens
    from synvita.video_llm import unwrap
    hf = unwrap(model)
    rows, masks = [], []
    for i, text in enumerate(captions):
        _, ids, _, visible = prompt_tokens(processor, hf.config.model_type, text,
                                           hidden[i] if hidden else None, prompt)
        n = [num_video_tokens if t == hf.config.video_token_id else 1 for t in ids]  # expand <video>
        rows.append(sum(([t] * k for t, k in zip(ids, n)), []))
        masks.append(sum(([int(v)] * k for v, k in zip(visible, n)), []))
    width = max(map(len, rows))
    pad = processor.tokenizer.pad_token_id or 0
    input_ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
    attention_mask = torch.tensor([[0] * (width - len(m)) + m for m in masks])
    # positions count real tokens only (left padding does not shift them); hidden t' tokens keep
    # their positions: t' is the same caption with some words made invisible, not a new text.
    not_pad = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    position_ids = (not_pad.cumsum(1) - 1).clamp(min=0)
    return input_ids, attention_mask, position_ids, answer_token_ids(processor.tokenizer, text)


def caption_losses(logits, ids, n_pos, yes, no, quote, pad, weights=None, ask=True):
    """Two dense losses over the quoted caption of n_pos positive prompts (rows [:n_pos]) and their
    negatives (rows [n_pos:], left-padded like them):

    - the caption LM loss: predict each word of the positive caption (grounds the words); with
      `weights` (a (vocab,) tensor) a word's loss counts weights[word] times (mean over the weights);
    - the prefix loss: at every position from the opening quote on, logit(Yes) - logit(No) says
      whether the caption read so far is still the true one (1 up to the first token where the
      negative departs from the caption, 0 from there on). It teaches where a caption goes wrong,
      which Eq. (2)'s single answer at the end of the prompt teaches only very slowly. Without `ask`
      it stops at the closing quote: the end of the question, where the answer is read, is never trained."""
    import torch
    import torch.nn.functional as F
    inside = (ids[:n_pos] == quote).cumsum(1) == 1  # the opening quote and the caption's words
    targets = torch.where(inside[:, 1:], ids[:n_pos, 1:], -100)
    l_lm = F.cross_entropy(logits[:n_pos, :-1].transpose(1, 2), targets, reduction="none")
    w = inside[:, 1:].float() * (1.0 if weights is None else weights[ids[:n_pos, 1:]])
    l_lm = (l_lm * w).sum() / w.sum()
    labels = torch.full(ids.shape, -1.0)
    width = ids.shape[1]
    for j in range(n_pos):
        p, n = [t for t in ids[j].tolist() if t != pad], [t for t in ids[n_pos + j].tolist() if t != pad]
        first = next((k for k, (a, b) in enumerate(zip(p, n)) if a != b), min(len(p), len(n)))
        q, end_p, end_n = p.index(quote), len(p), len(n)
        if not ask:  # up to and with the closing quote
            end_p, end_n = p.index(quote, q + 1) + 1, n.index(quote, q + 1) + 1
        labels[j, width - len(p) + q: width - len(p) + end_p] = 1.0
        labels[n_pos + j, width - len(n) + q: width - len(n) + end_n] = (torch.arange(q, end_n) < first).float()
    keep = labels >= 0
    l_prefix = F.binary_cross_entropy_with_logits((logits[..., yes] - logits[..., no])[keep], labels[keep])
    return l_lm, l_prefix


def word_weights(tokenizer, direction_weight=1.0):
    """The caption LM's weight of each vocabulary word: direction_weight for the words that name a
    direction (MOTIONS), 1 for the others."""
    import torch
    weights = torch.ones(len(tokenizer))
    weights[tokenizer.convert_tokens_to_ids(list(MOTIONS))] = direction_weight
    return weights


def video_llm_losses(model, processor, clips, pos, neg, weights=None, ask=True):
    """The base video LLM's pretraining losses: Eq. (2) on f(V, t^r) vs f(V, t^neg) and the
    caption_losses (LM words weighted by `weights`), in the toy's prompt (PROMPT). Without `ask`, no
    Eq. (2) and no prefix loss after the caption: the entailment question is never answered."""
    import torch
    from transformers.modeling_outputs import BaseModelOutputWithPooling
    from common import loss_real
    from synvita.shared_prefix import encode_videos
    features = encode_videos(model, processor, list(clips))  # (B, L, hidden)
    ids, mask, positions, (yes, no) = build_text_batch(model, processor, pos + neg, features.shape[1], prompt=PROMPT)
    video = BaseModelOutputWithPooling(pooler_output=torch.cat([features, features]))
    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, mm_encoder_outputs={"video": video}).logits
    a = logits[:, -1, yes] - logits[:, -1, no]
    tok = processor.tokenizer
    return (loss_real(a[: len(pos)], a[len(pos):]) * ask,  # 0 when not asked
            *caption_losses(logits, ids, len(pos), yes, no, tok.convert_tokens_to_ids('"'), tok.pad_token_id, weights, ask))


def vqa_losses(model, processor, clips, pos, neg, weights=None, rng=random):
    """A frame VQA model's pretraining losses on one random frame per clip: the cross-entropy of
    answering "Yes" (caption) / "No" (negative) over the whole vocabulary, as VQAScore reads P(Yes),
    and the caption_losses (LM words weighted by `weights`), in 02_weight.py's VQAScore prompt."""
    import torch
    import torch.nn.functional as F
    frames = [clip[rng.randrange(FRAMES)] for clip in clips]
    prompts = [processor.apply_chat_template([{"role": "user", "content": [
        {"type": "image"}, {"type": "text", "text": VQA_QUESTION.format(caption=c)}]}], add_generation_prompt=True)
        for c in pos + neg]
    inputs = processor(images=frames + frames, text=prompts, padding=True, padding_side="left", return_tensors="pt")
    logits = model(**inputs).logits
    tok = processor.tokenizer
    yes, no = tok.convert_tokens_to_ids("Yes"), tok.convert_tokens_to_ids("No")
    answers = torch.tensor([yes] * len(pos) + [no] * len(neg))
    return (F.cross_entropy(logits[:, -1], answers),
            *caption_losses(logits, inputs["input_ids"], len(pos), yes, no, tok.convert_tokens_to_ids('"'), tok.pad_token_id,
                            weights))


def pretrain(out_dir, kind="video", steps=3000, batch_size=16, lr=1e-3, pool=3000, seed=0, types=TYPES, log_every=100,
             pool_dir=None, direction_weight=1.0, ask=True, **sizes):
    """Pretrain a toy model from scratch on real toy clips and save it (model + processor) to
    out_dir, where the stages load it by path like a hub checkpoint. kind: "video" (the base video
    LLM f of 03/04, a toy Video-LLaVA) or "vqa" (one member of 02's VQA ensemble, a toy LLaVA-1.5
    that sees one frame). types: the misalignment types of the hard negatives. direction_weight: the
    caption LM's weight of the words that name a direction (word_weights). ask ("video" only): False
    trains no answer to the question (no Eq. 2, prefix loss up to the closing quote). pool_dir: where the
    pool's clips are written (default: <out_dir>/../pool). sizes: hidden, text_layers, vision_layers,
    patch.

    Loss: the answer loss (Eq. 2 for "video") + the two caption_losses (LM and prefix); negatives
    start as captions of other clips (easy) and become minimal edits of `types` over the first
    half; AdamW, 100 warm-up steps, cosine decay, gradient clipping at 1. From scratch, Eq. (2) on
    minimal edits alone stays at chance for thousands of steps; README's toy-world section has what
    this recipe measured."""
    import math
    import torch
    from synvita.disk import save_json
    from synvita.runs import progress, seed_everything
    seed_everything(seed)
    patch = sizes.pop("patch", 8)
    new = new_video_llava if kind == "video" else new_llava
    model, processor = new(build_tokenizer(), patch=patch, seed=seed, **sizes)
    pool_dir = pool_dir or os.path.join(os.path.dirname(os.path.abspath(out_dir)), "pool")
    scenes, clips = clip_pool(pool_dir, pool, seed=10**5)
    losses = functools.partial(video_llm_losses, ask=ask) if kind == "video" else vqa_losses
    weights = word_weights(processor.tokenizer, direction_weight)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 100) * 0.5 * (1 + math.cos(math.pi * s / steps)))
    rng, log = random.Random(seed), []
    for step in progress(range(steps), total=steps, desc=f"pretrain toy {kind} model {os.path.basename(out_dir)}"):
        easy = 0.5 * max(0.0, 1 - 2 * step / steps)
        l_answer, l_lm, l_prefix = losses(model, processor, *pretraining_batch(scenes, clips, rng, batch_size, easy, types),
                                          weights)
        opt.zero_grad()
        (l_answer + l_lm + l_prefix).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        schedule.step()
        if (step + 1) % log_every == 0 or step + 1 == steps:
            log.append({"step": step + 1, **{k: round(v.item(), 4) for k, v in
                                             (("answer", l_answer), ("lm", l_lm), ("prefix", l_prefix))}})
    model.eval()
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    save_json(os.path.join(out_dir, "pretrain.json"), {
        "kind": kind, "steps": steps, "batch_size": batch_size, "lr": lr, "pool": pool, "seed": seed,
        "types": types if isinstance(types, dict) else list(types), "direction_weight": direction_weight, "ask": ask,
        "sizes": sizes, "patch": patch, "prompt": PROMPT if kind == "video" else VQA_QUESTION, "log": log})
    return out_dir


def per_type_auc(labels, scores, kinds):
    """ROC-AUC (%) overall and per misalignment type; labels 1 = caption, 0 = its negative."""
    from sklearn.metrics import roc_auc_score
    labels, scores, kinds = np.asarray(labels), np.asarray(scores), np.asarray(kinds)
    return {k: 100 * float(roc_auc_score(labels[keep], scores[keep]))
            for k, keep in [("all", kinds == kinds), *((k, kinds == k) for k in TYPES)] if len(set(labels[keep])) == 2}


def entailment_auc(model, processor, n=256, seed=12345):
    """A quick check of a base video LLM: per_type_auc of f on n freshly rendered clips, each with
    its caption and one negative of a random applicable type."""
    import torch
    from common import alignment_logit
    from synvita.shared_prefix import yes_no_logits
    rng = random.Random(seed)
    scenes = [random_scene(rng) for _ in range(n)]
    kinds = [rng.choice(negative_types(s)) for s in scenes]
    videos = [render(s, seed=rng.randrange(2**31)) for s in scenes]
    texts = [caption(s) for s in scenes] + [caption(negative(s, k, rng)) for s, k in zip(scenes, kinds)]
    with torch.no_grad():
        yes_no = torch.cat([yes_no_logits(model, processor, [videos[i % n] for i in range(j, min(j + 32, 2 * n))],
                                          texts[j: j + 32], prompt=PROMPT) for j in range(0, 2 * n, 32)])
        f = alignment_logit(yes_no[:, 0], yes_no[:, 1]).numpy()  # a: AUC reads its order, the same as f's
    return per_type_auc([1] * n + [0] * n, f, kinds + kinds)


def direction_naming(model, processor, n=128, seed=54321):
    """How often (%) the base's caption LM names the direction of a single mover: on n freshly
    rendered clips of one thing, the argmax over the four direction words of the next-word
    prediction after "... moves" in the entailment prompt (chance 25 %). What the vision features
    carry, read without the entailment answer."""
    import torch
    from transformers.modeling_outputs import BaseModelOutputWithPooling
    from synvita.shared_prefix import encode_videos
    rng = random.Random(seed)
    scenes = [random_scene(rng, "single") for _ in range(n)]
    tok = processor.tokenizer
    words = tok.convert_tokens_to_ids(list(MOTIONS))
    right = 0
    with torch.no_grad():
        for j in range(0, n, 32):
            batch = scenes[j: j + 32]
            features = encode_videos(model, processor, [render(s, seed=rng.randrange(2**31)) for s in batch])
            ids, mask, positions, _ = build_text_batch(model, processor, [caption(s) for s in batch], features.shape[1],
                                                        prompt=PROMPT)
            logits = model(input_ids=ids, attention_mask=mask, position_ids=positions,
                           mm_encoder_outputs={"video": BaseModelOutputWithPooling(pooler_output=features)}).logits
            for row, s in enumerate(batch):
                at = next(k for k, t in enumerate(ids[row].tolist()) if t in words)  # the direction word
                right += words[int(logits[row, at - 1, words].argmax())] == tok.convert_tokens_to_ids(s.things[0].motion)
    return 100.0 * right / n


# ---- the committed models: what `python -m toyworld.run` uses, pretrained by these settings ---------
MEMBERS = ["base_video_llava", "vqa_0", "vqa_1", "vqa_2"]


def pretrained_missing(models):
    """The members of a models folder that are not pretrained yet (no pretrain.json)."""
    return [m for m in MEMBERS if not os.path.exists(os.path.join(models, m, "pretrain.json"))]


def pretrain_member(models, name, base_steps=1500, vqa_steps=2000, pool=3000):
    """Pretrain one member of MEMBERS into models/<name> (seeded); the pool of real clips they learn
    from is written to models/pool (not committed)."""
    pool_dir = os.path.join(models, "pool")
    if name == "base_video_llava":
        # ask=False: it learns to caption and where a caption goes wrong, never to answer the question
        return pretrain(os.path.join(models, name), "video", steps=base_steps, pool=pool, seed=0, types=BASE_TYPES,
                        pool_dir=pool_dir, ask=False, **BASE_SIZES)
    sizes = dict(VQA_MEMBERS[int(name.split("_")[1])])
    return pretrain(os.path.join(models, name), "vqa", steps=vqa_steps, pool=pool, pool_dir=pool_dir, types=VQA_TYPES,
                    direction_weight=VQA_DIRECTION_WEIGHT, **sizes)

