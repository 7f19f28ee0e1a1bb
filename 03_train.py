"""Implements §5 (Eqs. 5-7) and the training details of §6 of the paper: LoRA fine-tuning of a video
LLM on the real VideoCon triplets (V^r, t^r, t^s), their synthetic twins V^s = G(t^s) and, as the
authors' released recipe does, VideoCon's natural-language explanations (the NLE task of §6).

Reads 02_weight.py's CSV (videopath, caption, neg_caption, syn_video, score_syn_target,
score_syn_real, weight; `videopath` relative to --video_root, `syn_video` relative to the CSV's
folder unless absolute), or a plain VideoCon CSV with --no-use_syn (the VideoCon baseline), and
optionally VideoCon's explanation file (--feedback_csv: videopath, neg_caption, nle, split).
Writes to --out_dir: adapter/ (peft save_pretrained: PeftModel.from_pretrained(base, dir) loads it),
args.json, log.jsonl (one line per optimizer step: every loss term, lr, grad norm, rows/s),
checkpoints/step_NNNNNNN.pt (every --save_every steps, only the latest kept) and skipped.csv (the
rows that could not be trained on, with the reason, and the triplets trained without a twin).

The released Video-LLaVA recipe (4 GPUs x 4 rows = 16 rows a step, the explanation rows mixed in):
    torchrun --standalone --nproc_per_node 4 03_train.py --train_csv runs/generate/weighted.csv \
        --feedback_csv data/videocon/videocon_llm_feedback.csv --video_root data/videocon/videos \
        --out_dir runs/train
One process (the same global batches through gradient accumulation, the same result):
    python 03_train.py --train_csv runs/generate/weighted.csv --feedback_csv \
        data/videocon/videocon_llm_feedback.csv --video_root data/videocon/videos
The released loss instead of Eqs. (1)-(2)'s two-way form: add --answer_loss vocab.
CPU-sized (a tiny random model and 8 toy rows, from tests/tiny.py and tests/tiny_train.py):
    python -c "import sys; sys.path[:0] = ['.', 'tests']; import tiny, tiny_train; \
        tiny.tiny_video_llava('/tmp/tiny-video-llava'); tiny_train.write_toy_set('/tmp/toy')"
    python 03_train.py --model /tmp/tiny-video-llava --train_csv /tmp/toy/gen/weighted.csv \
        --feedback_csv /tmp/toy/feedback.csv --video_root /tmp/toy/videos --out_dir /tmp/toy/train \
        --batch_size 8 --micro_batch_size 4 --warmup_steps 0 --lr 1e-3 --num_workers 0

Rows, as the released code counts them: a triplet is TWO rows (its Yes row (V^r, t^r) and its No row
(V^r, t^s), each with its synthetic twin), an explanation ONE. A micro-batch holds --micro_batch_size
rows; a triplet's two rows stay in one micro-batch, so its two videos are decoded, vision-encoded
and run through the LM's prompt prefix once (common.answer_states) for all of its pairs.

NOTE (deviation): --answer_loss two_way (the default, Eqs. 1-2 as written) weighs the terms of
Eq. (7) unlike the released loss (--answer_loss vocab), which divides one sum of full-vocabulary
answer-token cross-entropies by the micro-batch's N answer tokens. A triplet with a twin brings four
pairs of two tokens each (the word and the end token): N = 8 a triplet. Where the word's
probability mass sits on Yes/No (full-vocabulary CE = the two-way CE) and the end token is learnt
(its CE ~ 0), the release's loss is L_real/8 + L_syn^phi/8 + lambda_scr * L_scr^phi/2 in our terms
(its L_scr averages half-triplets of two hinges, ours triplets of four): (L_real + L_syn^phi +
4 lambda_scr L_scr^phi) / 8. So --lambda_scr 4 gives the release's balance between the terms, at 1/8
of the scale (which gradient clipping sees), and only without explanations: their tokens join N.
--answer_loss vocab reproduces it exactly; the default keeps the paper's lambda_scr = 1.
"""
import contextlib
import functools
import glob
import json
import math
import os
import shutil
import signal
import sys
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F

import common
from common import WEIGHTINGS

TERMS = ("loss", "l_real", "l_syn", "l_scr", "l_nle")  # Eq. (7), its three terms and the NLE loss, logged apart
NLE_QUESTION = 'What is the misalignment between this video and the description: "{caption}"?'  # VideoCon's
RUN_ONLY = ("out_dir", "resume", "max_steps", "num_workers", "cache_videos", "save_every",
            "gradient_checkpointing")  # no effect on weights
# LoRA on the language model's linear layers only; the vision tower's q/k/v_proj stay frozen.
LORA_TARGETS = r".*language_model\..*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


@dataclass
class Args:
    train_csv: str = "runs/generate/weighted.csv"
    """02_weight.py's CSV (a plain VideoCon CSV with --no-use_syn)"""
    feedback_csv: str = ""
    """VideoCon's explanation file (videocon_llm_feedback.csv: videopath, neg_caption, nle, split):
    its `train` rows are mixed into the batches as the released recipe does; '' = entailment only"""
    video_root: str = "data/videocon/videos"
    """the folder that the CSV's `videopath` is relative to"""
    out_dir: str = "runs/train"
    """where adapter/, args.json, log.jsonl and checkpoints/ go"""
    model: str = common.DEFAULT_MODEL
    """the video LLM f(V, t): a hub id or a local directory"""
    prompt: str = "llava_v1"
    """Video-LLaVA's prompt (common.PROMPT_FORMATS): 'llava_v1' = the released code's, with LLaVA's
    system sentence; 'card' = the transformers model card's; other families use their chat template"""
    use_syn: bool = True
    """train on the synthetic twins V^s (Eqs. 5, 6); --no-use_syn is the VideoCon baseline, L = L_real"""
    use_scr: bool = True
    """add lambda_scr * L_scr^phi (Eq. 6); --no-use_scr is the ablation of Fig. 4"""
    answer_loss: str = "two_way"
    """'two_way': Eqs. (1)-(2) as written, each term a mean over its own pairs; 'vocab': the released
    code's full-vocabulary cross-entropy on every answer token (Yes/No and the end token, every
    explanation token), weighted by phi on synthetic pairs, divided by the micro-batch's answer tokens"""
    weighting: str = "csv"
    """phi: 'csv' reads the `weight` column of 02_weight.py; a WEIGHTINGS name recomputes it from
    score_syn_target / score_syn_real ('fixed' = unweighted Eq. 3, 'difference' = Eq. 4; the paper's
    Video-LLaVA run used 'target_x_inv_real', Table 4)"""
    lambda_scr: float = 1.0
    """lambda_scr of Eq. (7): 1.0 for Video-LLaVA, 1e-2 for mPLUG-Owl"""
    gamma: float = 0.2
    """the margin g of Eq. (6)"""
    lora_r: int = 32
    """LoRA rank"""
    lora_alpha: int = 32
    """LoRA scaling alpha"""
    lora_dropout: float = 0.05
    """dropout on the LoRA input"""
    lr: float = 5e-5
    """peak learning rate (5e-5 for Video-LLaVA, 1e-4 for mPLUG-Owl)"""
    weight_decay: float = 1e-4
    """AdamW weight decay"""
    max_grad_norm: float = 1.0
    """gradient clipping"""
    warmup_steps: int = 200
    """linear warm-up steps, then cosine decay to 0"""
    num_epochs: int = 1
    """passes over the CSV"""
    batch_size: int = 16
    """GLOBAL batch in the released code's rows (a triplet = its Yes row + its No row, an explanation =
    1 row) per optimizer step over all processes and accumulation steps: 16 = the released 4 GPUs x 4,
    so one epoch is (2 x triplets + explanations) / 16 steps, as released"""
    micro_batch_size: int = 4
    """rows per process per forward pass (the released per-GPU batch); at least 2 (one triplet)"""
    num_frames: int = 8
    """frames per video"""
    frame_sampling: str = "uniform"
    """'uniform' (np.linspace, Video-LLaVA) or 'middle' (VideoCon / mPLUG-Owl)"""
    bf16: bool = True
    """bf16 weights and autocast on GPU (CPU always runs float32); the LoRA weights stay float32"""
    gradient_checkpointing: bool = True
    """recompute the LLM's activations in the backward pass (non-reentrant)"""
    num_workers: int = 2
    """DataLoader processes that decode the next micro-batches' videos"""
    cache_videos: bool = False
    """keep every decoded video in memory (in each process that decodes), so later epochs do not
    decode it again: for small sets trained over several epochs, like the toy world's; all of
    VideoCon would not fit"""
    save_every: int = 100
    """write a checkpoint every this many optimizer steps"""
    resume: bool = False
    """continue from the latest checkpoint in out_dir/checkpoints"""
    max_steps: int = 0
    """stop after this optimizer step, as if killed there (0 = run to the end); the schedule still spans the full run"""
    seed: int = 0
    """seed of the LoRA initialisation, the epoch shuffles and the LoRA dropout"""


def number(cell):
    """A CSV cell as a float; NaN (the row is then skipped) if it is empty or not a number."""
    try:
        return float(cell)
    except ValueError:
        return float("nan")


# ---- data: triplets (V^r, t^r, t^s), twins V^s, weights w = phi, and explanations ---------------
def load_triplets(args):
    """The CSV rows as triplets with absolute video paths and the weight w (phi clamped at 0, as in the
    released code). A row whose real video is missing is a counted skip. A row whose twin cannot be
    used (no syn_video, its file missing, a missing/NaN weight or score) trains on L_real alone, its
    synthetic terms 0, as the released code trains such rows; it is counted and listed too. Both go
    to skipped.csv with the reason. A video that exists but cannot be decoded stops the run."""
    if args.weighting != "csv" and args.weighting not in WEIGHTINGS:
        raise ValueError(f"--weighting {args.weighting!r}: use 'csv' or one of {sorted(WEIGHTINGS)}")
    scores = {"csv": ["weight"], "fixed": []}.get(args.weighting, ["score_syn_target", "score_syn_real"])
    texts = ["videopath", "caption", "neg_caption"]  # an empty syn_video is a triplet without a twin
    rows = common.read_csv(args.train_csv, texts + (["syn_video"] + scores if args.use_syn else []), texts=texts)
    for c in scores if args.use_syn else []:  # VQAScores lie in [0, 1], phi <= 1 (a NaN is a counted skip below)
        low = 0 if c.startswith("score") else -math.inf  # a negative weight is clamped at 0 below
        if bad := [f"{line} ({r[c]})" for line, r in zip(rows.lines, rows) if not low <= number(r[c]) <= 1
                   and not math.isnan(number(r[c]))]:
            raise ValueError(f"{args.train_csv}: {c} outside [{low}, 1] on line(s) {', '.join(bad[:10])}")
    column = {c: np.array([number(r[c]) for r in rows]) for c in (scores if args.use_syn else [])}
    if not args.use_syn or args.weighting == "fixed":
        w = np.ones(len(rows))
    elif args.weighting == "csv":
        w = column["weight"]
    else:
        ft, fr = column["score_syn_target"], column["score_syn_real"]
        w = np.where(np.isfinite(ft) & np.isfinite(fr), WEIGHTINGS[args.weighting](ft, fr), np.nan)
    w = np.maximum(w, 0.0)  # phi >= 0 (NaN stays NaN)
    csv_dir = os.path.dirname(os.path.abspath(args.train_csv))
    keep, skipped = [], []
    for i, r in enumerate(rows):
        t = dict(kind="triplet", line=rows.lines[i], real=os.path.join(args.video_root, r["videopath"]),
                 caption=r["caption"], neg=r["neg_caption"], syn=None, w=0.0, rows=2)
        if not os.path.isfile(t["real"]):
            skipped.append(dict(file=args.train_csv, line=t["line"], videopath=r["videopath"], reason=f"video not found: {t['real']}"))
            continue
        keep.append(t)
        if not args.use_syn:
            continue
        syn = os.path.join(csv_dir, r["syn_video"]) if r["syn_video"] else ""  # an absolute syn_video stays as it is
        no_twin = ("no syn_video" if not syn else f"synthetic video not found: {syn}" if not os.path.isfile(syn)
                   else "weight is missing or not a number" if not math.isfinite(w[i]) else "")
        if no_twin:
            skipped.append(dict(file=args.train_csv, line=t["line"], videopath=r["videopath"], reason=f"trained without a twin: {no_twin}"))
        else:
            t.update(syn=syn, w=float(w[i]))
    if not keep:
        raise ValueError(f"{args.train_csv}: no row can be trained on ({len(skipped)} skipped: {skipped[0]['reason']})")
    return keep, skipped


def load_explanations(args):
    """VideoCon's explanation (NLE) rows, the second task of §6: in videocon_llm_feedback.csv's layout
    (videopath, neg_caption, nle, + split), the rows of split `train` (all rows without a split
    column). Each is asked `What is the misalignment between this video and the description:
    "<neg_caption>"?` and trained on the explanation's tokens; like the released code's rows without
    a syn_video, it has no synthetic twin and no t'. Returns (rows, skipped)."""
    if not args.feedback_csv:
        return [], []
    texts = ["videopath", "neg_caption", "nle"]  # an empty one is a bad row of the reader, named and counted
    rows = common.read_csv(args.feedback_csv, texts, texts=texts)
    keep, skipped = [], []
    for line, r in zip(rows.lines, rows):
        if r.get("split", "train") != "train":
            continue
        e = dict(kind="nle", line=line, real=os.path.join(args.video_root, r["videopath"]), neg=r["neg_caption"],
                 nle=r["nle"].strip(), rows=1)
        if os.path.isfile(e["real"]):
            keep.append(e)
        else:
            skipped.append(dict(file=args.feedback_csv, line=line, videopath=r["videopath"], reason=f"video not found: {e['real']}"))
    return keep, skipped


def pack(order, sizes, m):
    """Cut a shuffled `order` of items into micro-batches of m released rows: a triplet counts 2 (its
    Yes and No rows, kept together so that they share their two videos), an explanation 1. An item
    that does not fit what is left of a micro-batch waits for the next one, and the next item that
    fits fills the gap; if none is left (an odd m, no explanation left) the micro-batch is one row
    short. The tail that cannot fill m - 1 rows is dropped."""
    from collections import Counter, deque
    queue, left, out = deque(order), Counter(sizes[i] for i in order), []
    while queue:
        batch, free, k = [], m, 0
        while free and k < len(queue) and any(left[size] for size in range(1, free + 1)):
            item = queue[k]
            if sizes[item] > free:
                k += 1  # it waits at the front for the next micro-batch
                continue
            del queue[k]
            left[sizes[item]] -= 1
            batch.append(item)
            free -= sizes[item]
        if free > 1:  # the queue ran out: the tail is dropped (drop_last)
            break
        out.append(batch)
    return out


def epoch_micro_batches(items, epoch, args):
    """Every micro-batch of epoch `epoch`: a permutation of the items seeded by (seed, epoch), the
    same on every rank (as DistributedSampler.set_epoch does), packed into micro-batches of
    --micro_batch_size released rows."""
    g = torch.Generator().manual_seed(common.example_seed(args.seed, "epoch", epoch))
    return pack(torch.randperm(len(items), generator=g).tolist(), [it["rows"] for it in items], args.micro_batch_size)


def micro_batches(plan, step, accum, dist):
    """This rank's `accum` micro-batches for optimizer step `step`. plan: per epoch, its micro-batches.

    A global batch is world_size x accum consecutive micro-batches (batch_size released rows; a tail
    that fills no global batch is dropped, drop_last); rank r takes micro-batches r*accum ...
    r*accum + accum - 1 of it. The micro-batches do not depend on the number of processes, so the
    global batches are the same for any number of processes, and a resume needs only the step."""
    per_global = accum * dist.world_size
    for epoch in plan:
        if step < len(epoch) // per_global:
            first = step * per_global + dist.rank * accum
            return epoch[first: first + accum]
        step -= len(epoch) // per_global
    raise IndexError(f"step {step} is past the end of the plan")


def load_videos(batch, args, cache=None):
    """DataLoader collate (runs in a worker): decode each distinct video of a micro-batch once; with
    a `cache` (a dict: --cache_videos) each video only the first time this process meets it."""
    paths = list(dict.fromkeys([r["real"] for r in batch] + [r["syn"] for r in batch if r.get("syn")]))
    if cache is None:
        return batch, paths, [common.read_video(p, args.num_frames, args.frame_sampling) for p in paths]
    for p in paths:
        if p not in cache:
            cache[p] = common.read_video(p, args.num_frames, args.frame_sampling)
    return batch, paths, [cache[p] for p in paths]


def die_with(parent, worker_id):
    """DataLoader worker_init_fn: the kernel ends this worker when the training process dies, even
    by SIGKILL (Linux prctl PR_SET_PDEATHSIG). Without it, workers outlived a killed run (~0.5 GB
    each): PyTorch's own parent check does not reach a worker that is stuck elsewhere."""
    if sys.platform.startswith("linux"):
        import ctypes
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the training process died before prctl took effect
        os._exit(1)


# ---- every pair of a micro-batch, in one call ---------------------------------------------------
def micro_batch_pairs(model, processor, batch, paths, frames, args):
    """Each pair's answer scores, from ONE common.answer_states call: each video's prompt prefix runs
    once for all of its pairs. The pairs of a triplet are named
        "rr" = (V^r, t^r)  "rs" = (V^r, t^s)                      Eq. (2)
        "ss" = (V^s, t^s)  "sr" = (V^s, t^r)                      Eq. (5), triplets with a twin
        "r'" = (V^r, t')   "s'" = (V^s, t')                       Eq. (6), with --use_scr
    t' on a video is that video's OWN caption (t^r on V^r, t^s on V^s) with the words outside
    LCS(t^r, t^s) hidden from attention, as the released code masks the row's own caption; an
    explanation row is the pair "nle" = (V^r, its question about t^s), answered by the explanation.

    Returns per pair (item position in batch, name, a, tokens): a = logit_Yes - logit_No (Eq. 1, in
    float32); tokens = (logits (K, vocab), targets (K,)) of the answer's K tokens -- the word or the
    explanation, then the end token, teacher-forced -- or None where no token loss is asked (t' pairs,
    and the entailment pairs under --answer_loss two_way)."""
    hf, tok = common.unwrap(model), processor.tokenizer
    where = {p: k for k, p in enumerate(paths)}
    text, _ = common.entailment_prompt(processor, hf.config.model_type, "", args.prompt)
    word = dict(zip(("Yes", "No"), common.answer_token_ids(tok, text)))
    end = [tok.eos_token_id]  # the token that ends an answer (LLaMA's </s>, as the released "ASSISTANT: Yes</s>")
    specs = []  # (item, name, video, caption, hidden-from, question, answer ids)
    for k, r in enumerate(batch):
        if r["kind"] == "nle":
            asked, _ = common.entailment_prompt(processor, hf.config.model_type, r["neg"], args.prompt, NLE_QUESTION)
            specs.append((k, "nle", r["real"], r["neg"], None, NLE_QUESTION, common.answer_ids(tok, asked, r["nle"]) + end))
            continue
        token = args.answer_loss == "vocab"
        yes, no = ([word["Yes"]] + end, [word["No"]] + end) if token else (None, None)  # the word, then the end
        specs += [(k, "rr", r["real"], r["caption"], None, None, yes), (k, "rs", r["real"], r["neg"], None, None, no)]
        if r["syn"]:
            specs += [(k, "ss", r["syn"], r["neg"], None, None, yes), (k, "sr", r["syn"], r["caption"], None, None, no)]
            if args.use_scr:
                specs += [(k, "r'", r["real"], r["caption"], r["neg"], None, None),
                          (k, "s'", r["syn"], r["neg"], r["caption"], None, None)]
    states, logits = common.answer_states(
        model, processor, frames, [s[3] for s in specs], [where[s[2]] for s in specs],
        hidden=[common.hidden_word_spans(s[3], s[4]) if s[4] else None for s in specs], prompt=args.prompt,
        questions=[s[5] or common.QUESTION for s in specs], answers=[s[6] or [] for s in specs])
    yes_no = common.answer_logits(model, torch.stack([h[0] for h in states]), [word["Yes"], word["No"]])
    a = common.alignment_logit(yes_no[:, 0], yes_no[:, 1])  # Eq. (1); row j of a pair's states and logits predicts its answer token j
    return [(k, name, a[i], (z, torch.tensor(answer, device=z.device)) if answer else None)
            for i, ((k, name, *_, answer), z) in enumerate(zip(specs, logits))]


def objective(pairs, batch, args):
    """Eq. (7) and its terms, plus the explanations' loss l_nle, from micro_batch_pairs' output.

    --answer_loss two_way: each term is a mean over its own triplets (Eqs. 2, 5, 6) and l_nle the mean
    token cross-entropy of the explanations. A triplet without a twin has w = 0, so its synthetic
    terms are exactly 0 (its absent scores read as 0). --answer_loss vocab: the released loss,
    common.answer_token_loss over the micro-batch's answer tokens, the explanations' among them; L_scr
    then averages the half-triplets that have a twin, as released (half of Eq. 6's per-triplet sum)."""
    device = pairs[0][2].device
    zero = torch.zeros((), device=device)
    triplets = [k for k, r in enumerate(batch) if r["kind"] == "triplet"]
    a = {(k, name): v for k, name, v, _ in pairs}
    col = lambda name: torch.stack([a.get((k, name), zero) for k in triplets])  # noqa: E731, (b,)
    w = torch.tensor([batch[k]["w"] for k in triplets], device=device)
    tokens = {name: [(batch[k]["w"] if name in ("ss", "sr") else 1.0, t) for k, n, _, t in pairs if n == name and t]
              for name in ("rr", "rs", "ss", "sr", "nle")}
    if args.answer_loss == "two_way":
        # ---- §3 Eq. (2): real videos, positive vs LLM-written negative caption ----
        l_real = common.loss_real(col("rr"), col("rs")) if triplets else zero
        # ---- §5 Eq. (5): weighted synthetic loss (w = 1 is Eq. 3) ----
        l_syn = common.loss_syn(col("ss"), col("sr"), w) if triplets and args.use_syn else zero
        nle = [t for _, t in tokens["nle"]]
        l_nle = F.cross_entropy(torch.cat([x for x, _ in nle]), torch.cat([y for _, y in nle])) if nle else zero
    else:  # the released code's token loss: one sum over the micro-batch's answer tokens, / their number N
        n_tokens = sum(len(y) for group in tokens.values() for _, (_, y) in group)
        def part(*names):
            group = [(wk, t) for name in names for wk, t in tokens[name]]
            if not group:
                return zero
            logits, targets = torch.cat([x for _, (x, _) in group]), torch.cat([y for _, (_, y) in group])
            weights = torch.cat([torch.full((len(y),), wk, device=device) for wk, (_, y) in group])
            return common.answer_token_loss(logits, targets, weights, n_tokens)
        l_real, l_syn, l_nle = part("rr", "rs"), part("ss", "sr"), part("nle")
    # ---- §5 Eq. (6): f(own) > f(t') > f(other) on both videos; column 0 = V^s, column 1 = V^r ----
    l_scr = zero
    twins = sum(batch[k]["syn"] is not None for k in triplets)
    if args.use_syn and args.use_scr and twins:
        l_scr = common.loss_scr(torch.stack([col("ss"), col("rr")], 1), torch.stack([col("s'"), col("r'")], 1),
                                torch.stack([col("sr"), col("rs")], 1), w, args.gamma)
        if args.answer_loss == "vocab":  # the release's mean is over its half-triplets with a twin
            l_scr = l_scr * len(triplets) / (2 * twins)
    # ---- §5 Eq. (7): L = L_real + L_syn^phi + lambda_scr L_scr^phi, plus the explanations' loss ----
    loss = common.total_loss(l_real, l_syn, l_scr, args.lambda_scr) + l_nle
    return dict(zip(TERMS, (loss, l_real, l_syn, l_scr, l_nle)))


# ---- checkpoints: LoRA weights, optimizer, scheduler and step; written atomically ---------------
def save_checkpoint(args, step, plan, model, optimizer, scheduler):
    path = os.path.join(args.out_dir, "checkpoints", f"step_{step:07d}.pt")
    lora = {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad}
    with common.atomic_path(path) as tmp:
        torch.save(dict(step=step, plan=plan, lora=lora, optimizer=optimizer.state_dict(),
                        scheduler=scheduler.state_dict()), tmp)
    for old in glob.glob(os.path.join(args.out_dir, "checkpoints", "step_*.pt")):
        if old != path:
            os.remove(old)  # only the latest is kept (a LoRA + AdamW state of a 7B model is ~1 GB)


def load_checkpoint(args, plan, model, optimizer, scheduler):
    """Restore the latest checkpoint; returns the step to continue from (0 if there is none).

    No RNG state needs restoring: the only randomness after the LoRA initialisation is the LoRA
    dropout, reseeded at every micro-step from (seed, step, rows), and the epoch shuffles, seeded
    from (seed, epoch); the data position is the step number itself."""
    paths = sorted(glob.glob(os.path.join(args.out_dir, "checkpoints", "step_*.pt")))
    if not paths:
        common.print0(f"--resume: no checkpoint in {args.out_dir}/checkpoints, starting from step 0")
        return 0
    state = torch.load(paths[-1], map_location="cpu", weights_only=True)
    if differ := common.settings_diff(state["plan"], plan):
        raise ValueError(f"{paths[-1]}: written with other settings ({differ}); resume with the same settings")
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(state["lora"][n])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    common.print0(f"resumed from {paths[-1]} (step {state['step']})")
    return state["step"]


def main(args):
    from peft import LoraConfig, get_peft_model
    from torch.nn.parallel import DistributedDataParallel
    from transformers import get_cosine_schedule_with_warmup

    dist = common.setup_distributed()
    cuda = dist.device.startswith("cuda")
    # ---- data: triplets and explanations, packed into the same global batches for any number of processes ----
    if args.answer_loss not in ("two_way", "vocab"):
        raise ValueError(f"--answer_loss {args.answer_loss!r}: use 'two_way' or 'vocab'")
    triplets, skipped = load_triplets(args)
    explanations, skipped_nle = load_explanations(args)
    items, skipped = triplets + explanations, skipped + skipped_nle
    accum, rest = divmod(args.batch_size, max(args.micro_batch_size, 1) * dist.world_size)
    if rest or not accum or args.micro_batch_size < 2:
        raise ValueError(f"--batch_size {args.batch_size} is not a multiple of --micro_batch_size "
                         f"{args.micro_batch_size} (at least 2: a triplet is 2 rows) x {dist.world_size} processes")
    epochs = [epoch_micro_batches(items, e, args) for e in range(args.num_epochs)]
    per_global = accum * dist.world_size
    total = sum(len(e) // per_global for e in epochs)
    if total == 0:
        raise ValueError(f"{args.train_csv}: {2 * len(triplets) + len(explanations)} usable rows, fewer than one "
                         f"--batch_size {args.batch_size}")
    if total == 1 and args.warmup_steps > 0:  # the linear warm-up starts at lr 0: nothing would train
        raise ValueError(f"1 optimizer step with --warmup_steps {args.warmup_steps}: it runs at lr 0 and the adapter "
                         f"would stay untrained; pass --warmup_steps 0 (or more rows / --num_epochs)")
    stop = min(total, args.max_steps) if args.max_steps else total
    # what a checkpoint was made with: the CSVs' content and every setting that changes the weights
    plan = {**asdict(args), "train_csv": common.file_hash(args.train_csv), "items": len(items),
            "feedback_csv": common.file_hash(args.feedback_csv) if args.feedback_csv else ""}
    plan = {k: v for k, v in plan.items() if k not in RUN_ONLY}
    log_path = os.path.join(args.out_dir, "log.jsonl")
    no_twin = sum(r["syn"] is None for r in triplets) if args.use_syn else 0
    common.print0(f"{len(triplets)} triplets ({no_twin} without a twin, trained on L_real alone) and {len(explanations)} "
                  f"explanations; {len(skipped) - no_twin} rows skipped; all listed in skipped.csv. {total} steps of "
                  f"{args.batch_size} rows = {dist.world_size} processes x {accum} micro-batches x {args.micro_batch_size}")

    # ---- model: the frozen video LLM plus LoRA on its language model ----
    common.seed_everything(args.seed)  # the same LoRA initialisation on every rank
    dtype = torch.bfloat16 if cuda and args.bf16 else torch.float32
    model, processor = common.load_video_llm(args.model, dtype=dtype, device=dist.device)
    if args.gradient_checkpointing:  # non-reentrant; it also makes the input embeddings require grad
        model.activation_checkpointing_enable()
    model = get_peft_model(model, LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                                             target_modules=LORA_TARGETS))  # freezes every other weight
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    scheduler = get_cosine_schedule_with_warmup(optimizer, args.warmup_steps, total)
    start = load_checkpoint(args, plan, model, optimizer, scheduler) if args.resume else 0
    if dist.master:  # only now, with the model and data loaded, does a fresh run replace an older one here
        os.makedirs(args.out_dir, exist_ok=True)
        common.save_json(os.path.join(args.out_dir, "args.json"), asdict(args))
        common.write_csv(os.path.join(args.out_dir, "skipped.csv"), skipped, ["file", "line", "videopath", "reason"])
        if not args.resume:
            shutil.rmtree(os.path.join(args.out_dir, "checkpoints"), ignore_errors=True)
    if dist.master and os.path.exists(log_path):  # drop log lines of steps a killed run did after `start`
        lines = [ln for ln in open(log_path, encoding="utf-8") if json.loads(ln)["step"] <= start]
        with common.atomic_path(log_path) as tmp, open(tmp, "w", encoding="utf-8") as fh:
            fh.writelines(lines)
    # DDP all-reduces (averages) the LoRA gradients in the backward of the last micro-step.
    ddp = DistributedDataParallel(model, device_ids=[dist.local_rank] if cuda else None,
                                  broadcast_buffers=False) if dist.world_size > 1 else None
    net = ddp or model

    loader = torch.utils.data.DataLoader(
        items, batch_sampler=[mb for s in range(start, stop) for mb in micro_batches(epochs, s, accum, dist)],
        collate_fn=functools.partial(load_videos, args=args, cache={} if args.cache_videos else None),
        num_workers=args.num_workers,
        worker_init_fn=functools.partial(die_with, os.getpid()))
    batches = iter(loader)
    for step in range(start, stop):
        t0, lr = time.time(), scheduler.get_last_lr()[0]
        sums = torch.zeros(len(TERMS), device=dist.device)
        for j in range(accum):
            batch, paths, frames = next(batches)
            torch.manual_seed(common.example_seed(args.seed, step, *[(r["kind"], r["line"]) for r in batch]))  # LoRA dropout
            last = j == accum - 1  # gradients are all-reduced only on the last micro-step
            with contextlib.nullcontext() if ddp is None or last else ddp.no_sync():
                with torch.autocast("cuda", torch.bfloat16, enabled=cuda and args.bf16):
                    terms = objective(micro_batch_pairs(net, processor, batch, paths, frames, args), batch, args)
                if not all(torch.isfinite(v) for v in terms.values()):
                    raise FloatingPointError(
                        f"step {step + 1}: non-finite loss {({k: v.item() for k, v in terms.items()})} on "
                        f"lines {[(r['kind'], r['line']) for r in batch]} of {args.train_csv} / {args.feedback_csv} (videos {paths})")
                (terms["loss"] / accum).backward()
            sums += torch.stack([terms[k].detach().float() for k in TERMS])
        grad_norm = torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

        # ---- log every term, averaged over the global batch; rank 0 writes ----
        if ddp is not None:
            torch.distributed.all_reduce(sums)
        sums /= accum * dist.world_size
        if dist.master:
            line = dict(step=step + 1, **dict(zip(TERMS, sums.tolist())), lr=lr,
                        grad_norm=grad_norm.item(), rows_per_s=args.batch_size / (time.time() - t0))
            with open(log_path, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(line) + "\n")
            common.print0(" ".join(f"{k} {v:.4g}" for k, v in line.items()))
            if (step + 1) % args.save_every == 0:
                save_checkpoint(args, step + 1, plan, model, optimizer, scheduler)

    # ---- the adapter: rank 0 writes it to a temporary folder, then renames it ----
    if dist.master:
        final, tmp = os.path.join(args.out_dir, "adapter"), os.path.join(args.out_dir, f"adapter.tmp{os.getpid()}")
        model.save_pretrained(tmp)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        common.print0(f"saved {final}")
    if ddp is not None:
        torch.distributed.destroy_process_group()
    return model


if __name__ == "__main__":
    main(common.parse_args(Args))
