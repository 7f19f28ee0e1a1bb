"""The pairs (V, t) of 03_train.py's micro-batches: which pairs a triplet or an explanation brings
(typed: item, pair, twin j), their prompts and teacher-forced answers, ONE shared_prefix.answer_states
call for all of them (Eq. 1's forward), their alignment logits a arranged as the b triplets' columns
for Eqs. (2), (5) and (6), with Table 5's "ALL" (k twins a triplet) in one marked place
(twin_shares), and the items left out because a prompt runs past the model's positions."""
import functools
import math
import os
from typing import NamedTuple

import torch

import common
from synvita import runs, shared_prefix, training, triplets, video_llm

NLE_QUESTION = 'What is the misalignment between this video and the description: "{caption}"?'  # VideoCon's
# The pairs (V, t) of a triplet, by name, and the term of Eq. (7) that uses them:
#   "rr" = (V^r, t^r)   "rs" = (V^r, t^s)    Eq. (2): L_real
#   "ss" = (V^s, t^s)   "sr" = (V^s, t^r)    Eq. (5): L_syn^phi, only for a triplet with a twin V^s
#   "r'" = (V^r, t')    "s'" = (V^s, t')     Eq. (6): L_scr^phi, with --use_scr
# With several --train_csv files (Table 5's "ALL"), a triplet has a twin V^s_j from each CSV j that has one:
# a pair of twin j is the same pair with twin = j (its name: "ss1", "sr1", "s'1", ..., made by
# pair_name, never parsed back); "r'" is run once, as it does not depend on the twin.
# t' on a video is that video's OWN caption (t^r on V^r, t^s on V^s) with its words outside
# LCS(t^r, t^s) hidden from attention (footnote 2), as the released code masks the row's own caption.
# An explanation row has one pair, "nle" = (V^r, NLE_QUESTION about t^s), answered by its explanation.
TRIPLET_PAIRS = ("rr", "rs", "ss", "sr", "r'", "s'")
TWIN_PAIRS = ("ss", "sr", "s'")  # the pairs of one twin V^s_j, run once per twin


def pair_name(pair, twin=0):
    """A pair's name in Pairs and logs: `pair` itself for twin 0 (and every real or explanation pair),
    the twin index j appended for twin j >= 1 ("ss1", "sr1", "s'1", ...)."""
    return pair if twin == 0 else f"{pair}{twin}"


class PairSpec(NamedTuple):
    """One pair to run: which item, which video and caption, which twin, its prompt and its answer."""
    item: int  # the position of its triplet or explanation in the micro-batch
    pair: str  # which video and caption: one of TRIPLET_PAIRS ("rr" = (V^r, t^r), ...) or "nle"
    twin: int  # j: the twin V^s_j of a synthetic pair ("ss", "sr", "s'"); 0 for every other pair
    video: str  # V^r's or V^s's path
    caption: str  # the caption t asked about
    other_caption: str | None  # t' pairs: `caption`'s words outside LCS(caption, other_caption) are hidden
    question: str | None  # None: common.QUESTION, VideoCon's entailment question
    answer: list | None  # token ids fed after the prompt (teacher forcing); None: no token loss

    @property
    def name(self):
        """pair_name(pair, twin): "rr", "ss", "ss1", "nle", ..."""
        return pair_name(self.pair, self.twin)


class Pair(NamedTuple):
    """One pair's output of 03_train.py's micro_batch_pairs; a plain tuple (item, name, a, tokens) underneath."""
    item: int  # the position of its triplet or explanation in the micro-batch
    name: str  # PairSpec.name
    a: torch.Tensor  # 0-dim float32 alignment logit a = logit_Yes - logit_No (Eq. 1); f = sigmoid(a)
    tokens: tuple | None  # (logits (K, vocab), targets (K,)) of the K answer tokens; None: no token loss


def pair_specs(batch, processor, model_type, word, args):
    """The pairs to run for a micro-batch, item by item: a triplet's "rr", "rs", then with a twin "ss",
    "sr", then with --use_scr "r'", "s'", then those of its further twins j (twin = j; Table 5's
    "ALL"); an explanation's "nle". Answer tokens are fed only where a token loss reads them: an
    explanation's always; the entailment pairs' under --answer_loss vocab (the word Yes/No, then the
    end token). word: {"Yes": id, "No": id}."""
    end = [processor.tokenizer.eos_token_id]  # ends an answer (LLaMA's </s>, as the released "ASSISTANT: Yes</s>")
    specs = []
    for k, r in enumerate(batch):
        if r["kind"] == "nle":  # asked what is wrong with t^s on V^r; answered by the explanation
            asked, _ = common.entailment_prompt(processor, model_type, r["neg"], args.prompt, NLE_QUESTION)
            answer = common.answer_ids(processor.tokenizer, asked, r["nle"]) + end
            specs.append(PairSpec(k, "nle", 0, r["real"], r["neg"], None, NLE_QUESTION, answer))
            continue
        vocab = args.answer_loss == "vocab"  # the released loss trains the answer's tokens
        yes, no = ([word["Yes"]] + end, [word["No"]] + end) if vocab else (None, None)
        specs += [PairSpec(k, "rr", 0, r["real"], r["caption"], None, None, yes),  # V^r shows t^r: Yes
                  PairSpec(k, "rs", 0, r["real"], r["neg"], None, None, no)]  # V^r does not show t^s: No
        for j, (syn, _) in enumerate(triplets.twins(r)):  # one twin, or one per generator's CSV (Table 5's "ALL")
            specs += [PairSpec(k, "ss", j, syn, r["neg"], None, None, yes),  # V^s = G(t^s) shows t^s: Yes
                      PairSpec(k, "sr", j, syn, r["caption"], None, None, no)]  # V^s does not show t^r: No
            if args.use_scr:  # t' = the video's own caption, its words outside LCS(t^r, t^s) hidden
                # (V^r, t') does not depend on the twin: run once, with the first
                specs += [PairSpec(k, "r'", 0, r["real"], r["caption"], r["neg"], None, None)] if j == 0 else []
                specs += [PairSpec(k, "s'", j, syn, r["neg"], r["caption"], None, None)]
    return specs


def answer_words(model, processor, args):
    """{"Yes": id, "No": id}: the first token of each answer where the entailment prompt ends (Eq. 1)."""
    hf = video_llm.unwrap(model)  # the transformers model under LoRA (and DDP)
    text, _ = common.entailment_prompt(processor, hf.config.model_type, "", args.prompt)
    return dict(zip(("Yes", "No"), common.answer_token_ids(processor.tokenizer, text)))


def answer_states(model, processor, batch, paths, frames, args):
    """Every pair of a micro-batch (pair_specs), from ONE shared_prefix.answer_states call: each video is
    vision-encoded and its prompt prefix run once for all of its pairs. paths, frames: the micro-batch's
    distinct videos (training.load_videos). Returns (specs, word, states, logits): states[i] (K_i,
    hidden) and logits[i] (K_i, vocab) where pair i predicts its K_i = max(1, answer) answer tokens
    (row 0: the word Yes/No, then the teacher-forced answer's tokens), word as answer_words."""
    word = answer_words(model, processor, args)  # the answers' first token ids
    specs = pair_specs(batch, processor, video_llm.unwrap(model).config.model_type, word, args)
    where = {p: k for k, p in enumerate(paths)}  # a video's path -> its index in frames
    states, logits = shared_prefix.answer_states(
        model, processor, frames, [s.caption for s in specs], [where[s.video] for s in specs],
        hidden=[common.hidden_word_spans(s.caption, s.other_caption) if s.other_caption else None for s in specs],
        prompt=args.prompt, questions=[s.question or common.QUESTION for s in specs],
        answers=[s.answer or [] for s in specs])
    return specs, word, states, logits


# ---- the pairs' alignment logits a as the columns of Eqs. (2), (5) and (6) ----------------------
class Twin(NamedTuple):
    """One twin slot j of the micro-batch's b triplets, as Eqs. (2), (5) and (6) read ONE twin: the
    (b,) alignment logits a of each pair (V^r's, and twin j's V^s_j's) and w (b,), its weight."""
    rr: torch.Tensor  # a of (V^r, t^r)
    rs: torch.Tensor  # a of (V^r, t^s)
    r_shared: torch.Tensor  # a of (V^r, t')
    ss: torch.Tensor  # a of (V^s_j, t^s); 0 for a triplet without twin j
    sr: torch.Tensor  # a of (V^s_j, t^r)
    s_shared: torch.Tensor  # a of (V^s_j, t')
    w: torch.Tensor  # the weight of twin j: phi_j (0 for a triplet without it), or phi_j / k (twin_shares)


def triplet_logits(pairs, batch, zero):
    """The micro-batch's b triplets as columns: a {pair name: (b,) alignment logits} ({} if b = 0; a
    pair a triplet lacks, e.g. "ss" without a twin, reads 0), w (J, b): the weight phi of each
    triplet's twin j (0 where it has none; J = the most twins a triplet here has: 0 or 1 with one
    --train_csv), and k: each triplet's number of twins (a list). pairs: Pairs, or plain (item, name,
    a, tokens) tuples."""
    items = [triplets.twins(r) for r in batch if r["kind"] == "triplet"]  # each triplet's [(V^s, phi), ...]
    k = [len(t) for t in items]
    slots = max(k, default=0)  # J
    w = torch.tensor([[t[j][1] if j < len(t) else 0.0 for t in items] for j in range(slots)],
                     device=zero.device).reshape(slots, len(items))  # phi_j, 0 for a triplet without twin j
    if not items:  # a micro-batch of explanations only
        return {}, w, k
    by_item = {(i, name): a for i, name, a, _ in pairs}  # (item position, pair name) -> a, 0-dim
    where = [i for i, r in enumerate(batch) if r["kind"] == "triplet"]  # the triplets' positions in the batch
    names = [name for name in TRIPLET_PAIRS if name not in TWIN_PAIRS]  # rr, rs, r': one per triplet
    names += [pair_name(name, j) for j in range(slots) for name in TWIN_PAIRS]  # ss, sr, s' of each twin j
    return {name: torch.stack([by_item.get((i, name), zero) for i in where]) for name in names}, w, k


def twin_views(a, w):
    """The J twin slots as Twins: slot j holds V^r's columns and twin j's, with weight w[j] (a, w as
    triplet_logits gives them; w (J, b), or its rows rescaled). [] if no triplet here has a twin."""
    return [Twin(a["rr"], a["rs"], a["r'"], a[pair_name("ss", j)], a[pair_name("sr", j)], a[pair_name("s'", j)], w[j])
            for j in range(len(w))]


def over_twins(terms, zero):
    """The sum of one term per twin slot j (zero if there is none; the term itself if there is one)."""
    return functools.reduce(torch.add, terms) if terms else zero


# NOTE (deviation): with several --train_csv files (Table 5's "ALL": every generator's V^s of each
# t^s) a triplet has k twins. The paper does not say how their terms were combined, and the release
# has no config for "ALL"; we take, for a triplet, the MEAN over its k twins of the per-twin terms of
# Eqs. (5) and (6), so that a triplet with k twins weighs as much as one with a single twin: twin j
# enters L_syn^phi and L_scr^phi with weight phi_j / k. Eq. (6)'s hinges on V^r use the same logits
# for every twin, (V^r, t') included (run once), so they enter with weight mean_j phi_j. L_real is
# counted once per triplet. With one CSV (k <= 1) this is Eqs. (5)-(6) exactly as before.
def twin_shares(w, k):
    """Each twin's weight in the mean over its triplet's k twins, as the NOTE above says: phi_j / k,
    (J, b); with one twin (k <= 1) phi itself, exactly. w (J, b) and k as triplet_logits gives them;
    twin_views(a, twin_shares(w, k)) are then the twins that Eqs. (5) and (6), written for one twin,
    are summed over."""
    return w / torch.tensor(k, device=w.device).clamp(min=1)  # (J, b): phi_j / k, twin j's part of a triplet


def scr_logits(t):
    """Eq. (6)'s arguments for one Twin t, each (b, 2) with column 0 = V^s (the twin), column 1 = V^r:
    the video's own caption t^z, the shared t', the other video's caption t^zbar (common.loss_scr)."""
    own = torch.stack([t.ss, t.rr], 1)  # the logits of (V^s, t^s), (V^r, t^r)
    shared = torch.stack([t.s_shared, t.r_shared], 1)  # of (V^s, t'), (V^r, t')
    other = torch.stack([t.sr, t.rs], 1)  # of (V^s, t^r), (V^r, t^s)
    return own, shared, other


# ---- prompts past the model's positions ---------------------------------------------------------
def drop_long_prompts(model, processor, items, skipped, args):
    """Leave out every triplet or explanation one of whose prompts runs past the LLM's positions
    (video_llm.max_positions): past them f(V, t) runs on positions the model never saw, and its scores and
    gradients are silently wrong. Each of its rows (a merged triplet's rows of the later --train_csv
    files too) is named (file:line) in one printed line, listed in skipped.csv once with this reason (an
    earlier "trained without a twin" entry of the row is replaced: it is not trained at all) and counted
    in the summary. Returns (items, skipped)."""
    limit = video_llm.max_positions(model)
    if not math.isfinite(limit):  # a config that states no limit
        return items, skipped
    longest = prompt_positions(model, processor, items, args)  # (items,)
    over = [(it, n, where) for it, n in zip(items, longest) if n > limit
            for where in [(it["file"], it["line"]), *it.get("more_rows", [])]]  # each row of the item
    if over:  # one line, as disk.read_csv names its skipped rows
        runs.print0(f"{len(over)} row(s) skipped, prompt too long (past the model's {limit} positions): "
                      + ", ".join(f"{file}:{line}" for _, _, (file, line) in over[:20])
                      + (", ..." if len(over) > 20 else ""))
    gone = {where for _, _, where in over}  # a dropped row is listed once, for this reason alone
    skipped = [s for s in skipped if not (s["reason"].startswith(triplets.NO_TWIN) and (s["file"], s["line"]) in gone)]
    skipped = skipped + [dict(file=file, line=line, videopath=os.path.relpath(it["real"], args.video_root),
                              reason=f"prompt too long: {n} positions, the model has {limit}")
                         for it, n, (file, line) in over]
    return [it for it, n in zip(items, longest) if n <= limit], skipped


def prompt_positions(model, processor, items, args):
    """The positions the longest pair of each item takes, as 03_train.py's micro_batch_pairs runs it (pair_specs: t^r,
    t^s and t' (hidden words still take their positions), the answer tokens teacher-forced under
    --answer_loss vocab; an explanation's question and answer): (items,) ints. One real video, read
    once, gives the video's tokens (one count for every video of a LLaVA family; Qwen-VL's follows
    the video's size); shared_prefix.prompt_lengths counts each distinct prompt once, with its own question
    (an explanation asks another one than VideoCon's entailment question)."""
    word = answer_words(model, processor, args)  # as answer_states
    specs = pair_specs(items, processor, video_llm.unwrap(model).config.model_type, word, args)
    # a prompt's length follows from its caption, its question and how many answer tokens it feeds
    keys = [(s.caption, s.question or common.QUESTION, len(s.answer or [])) for s in specs]
    unique = list(dict.fromkeys(keys))  # each measured once (t' and the twins' pairs repeat captions)
    captions, questions, fed = zip(*unique)  # fed: only the count of answer tokens matters here
    video = training.decode(items[0]["real"], items[0], args)
    length = dict(zip(unique, shared_prefix.prompt_lengths(model, processor, video, captions, args.prompt,
                                                    [[0] * n for n in fed], questions)))  # last position + 1
    longest = [0] * len(items)
    for s, key in zip(specs, keys):
        longest[s.item] = max(longest[s.item], length[key])
    return longest
