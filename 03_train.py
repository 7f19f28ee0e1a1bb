"""Implements §5 (Eqs. 5-7) and the training details of §6 of the paper: LoRA fine-tuning of a video
LLM on the real VideoCon triplets (V^r, t^r, t^s) and their synthetic twins V^s = G(t^s).

Reads 02_weight.py's CSV (videopath, caption, neg_caption, syn_video, score_syn_target,
score_syn_real, weight; `videopath` relative to --video_root, `syn_video` relative to the CSV's
folder unless absolute), or a plain VideoCon CSV with --no-use_syn (the VideoCon baseline).
Writes to --out_dir: adapter/ (peft save_pretrained: PeftModel.from_pretrained(base, dir) loads it),
args.json, log.jsonl (one line per optimizer step: every loss term, lr, grad norm, rows/s),
checkpoints/step_NNNNNNN.pt (every --save_every steps, only the latest kept) and skipped.csv (the
rows that could not be trained on, with the reason; a counted skip, see load_triplets).

Paper scale (4 GPUs, Video-LLaVA-7B, global batch 32 = 8 rows per GPU x 4 GPUs):
    torchrun --standalone --nproc_per_node 4 03_train.py --train_csv runs/generate/weighted.csv \
        --video_root data/videocon/videos --out_dir runs/train
One process (the same global batches through gradient accumulation, the same result):
    python 03_train.py --train_csv runs/generate/weighted.csv --video_root data/videocon/videos
CPU-sized (a tiny random model and 8 toy rows, from tests/tiny.py and tests/tiny_train.py):
    python -c "import sys; sys.path[:0] = ['.', 'tests']; import tiny, tiny_train; \
        tiny.tiny_video_llava('/tmp/tiny-video-llava'); tiny_train.write_toy_set('/tmp/toy')"
    python 03_train.py --model /tmp/tiny-video-llava --train_csv /tmp/toy/gen/weighted.csv \
        --video_root /tmp/toy/videos --out_dir /tmp/toy/train --batch_size 4 --micro_batch_size 2 \
        --warmup_steps 1 --lr 1e-3 --num_workers 0

Efficient by design: the six scores of every row come from ONE common.alignment_logits call per
micro-batch; each of its videos is decoded and vision-encoded once, the LM reads the answer
position only, and t' is the caption itself with words hidden by the attention mask.

NOTE (deviation): the released code averages its answer-token loss over all answer tokens of the
micro-batch (2b real + 2b synthetic pairs) and scales the synthetic part by phi without dividing by
sum(phi); common.py averages per row. With one answer token per pair the release's value is
(L_real + L_syn^phi) / 4 (L_real / 2 without synthetic rows) while its L_scr is a mean over rows as
ours is, so our lambda_scr = 1 weighs L_scr 4x less against the cross-entropy terms than the
release's (--lambda_scr 4 restores its balance). Neither divides by sum(w): an all-zero-weight
batch trains on its real rows, its synthetic terms exactly 0.
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

import common
from common import WEIGHTINGS

TERMS = ("loss", "l_real", "l_syn", "l_scr")  # Eq. (7) and its three terms, logged separately
RUN_ONLY = ("out_dir", "resume", "max_steps", "num_workers", "save_every", "gradient_checkpointing")  # no effect on weights
# LoRA on the language model's linear layers only; the vision tower's q/k/v_proj stay frozen.
LORA_TARGETS = r".*language_model\..*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


@dataclass
class Args:
    train_csv: str = "runs/generate/weighted.csv"
    """02_weight.py's CSV (a plain VideoCon CSV with --no-use_syn)"""
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
    batch_size: int = 32
    """GLOBAL batch: real rows per optimizer step over all processes and accumulation steps"""
    micro_batch_size: int = 8
    """real rows per process per forward pass (each brings 2 videos and up to 6 captions)"""
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


# ---- data: triplets (V^r, t^r, t^s), twins V^s and weights w = phi ------------------------------
def load_triplets(args):
    """The CSV rows as dicts with absolute video paths and the weight w (phi clamped at 0, as in the
    released code). Rows with a missing/NaN weight or score, or a missing video file, are a counted
    skip: they are returned apart with the reason and written to skipped.csv. A video that exists but
    cannot be decoded stops the run (read_video names it)."""
    if args.weighting != "csv" and args.weighting not in WEIGHTINGS:
        raise ValueError(f"--weighting {args.weighting!r}: use 'csv' or one of {sorted(WEIGHTINGS)}")
    scores = {"csv": ["weight"], "fixed": []}.get(args.weighting, ["score_syn_target", "score_syn_real"])
    texts = ["videopath", "caption", "neg_caption"] + (["syn_video"] if args.use_syn else [])
    rows = common.read_csv(args.train_csv, texts + (scores if args.use_syn else []), texts=texts)
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
        t = dict(index=i, real=os.path.join(args.video_root, r["videopath"]), caption=r["caption"],
                 neg=r["neg_caption"], w=float(w[i]))
        if args.use_syn:
            t["syn"] = os.path.join(csv_dir, r["syn_video"])  # an absolute syn_video stays as it is
        missing = [p for p in (t["real"], t.get("syn")) if p and not os.path.isfile(p)]
        reason = ("weight is missing or not a number" if not math.isfinite(t["w"])
                  else f"video not found: {missing[0]}" if missing else "")
        if reason:
            skipped.append(dict(line=rows.lines[i], videopath=r["videopath"], reason=reason))
        else:
            keep.append(t)
    if not keep:
        raise ValueError(f"{args.train_csv}: no row can be trained on ({len(skipped)} skipped: {skipped[0]['reason']})")
    return keep, skipped


def micro_batches(num_rows, step, accum, dist, args):
    """Positions (into the kept rows) of this rank's `accum` micro-batches for optimizer step `step`.

    Epoch e shuffles the rows with a generator seeded by (seed, e), the same on every rank, as
    DistributedSampler.set_epoch(e) does, and cuts the permutation into global batches of
    batch_size rows (a tail that fills no batch is dropped, drop_last). Rank r takes micro-batches
    r*accum ... r*accum + accum - 1 of the global batch. So the global batches, and for a fixed
    micro_batch_size also the micro-batches, are the same for any number of processes, and the
    sampler's position after a resume is just the step number."""
    epoch, k = divmod(step, num_rows // args.batch_size)
    perm = torch.randperm(num_rows, generator=torch.Generator().manual_seed(common.example_seed(args.seed, "epoch", epoch)))
    batch = perm[k * args.batch_size: (k + 1) * args.batch_size].tolist()
    m = args.micro_batch_size
    return [batch[c * m: (c + 1) * m] for c in range(dist.rank * accum, (dist.rank + 1) * accum)]


def load_videos(batch, args):
    """DataLoader collate (runs in a worker): decode each distinct video of a micro-batch once."""
    paths = list(dict.fromkeys([r["real"] for r in batch] + [r["syn"] for r in batch if "syn" in r]))
    return batch, paths, [common.read_video(p, args.num_frames, args.frame_sampling) for p in paths]


def die_with(parent, worker_id):
    """DataLoader worker_init_fn: the kernel ends this worker when the training process dies, even
    by SIGKILL (Linux prctl PR_SET_PDEATHSIG). Without it, workers outlived a killed run (~0.5 GB
    each): PyTorch's own parent check does not reach a worker that is stuck elsewhere."""
    if sys.platform.startswith("linux"):
        import ctypes
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the training process died before prctl took effect
        os._exit(1)


# ---- the six alignment logits of a micro-batch, in one call -------------------------------------
def triplet_logits(model, processor, batch, paths, frames, args):
    """a = logit_Yes - logit_No of each row's pairs, from ONE alignment_logits call: the prompt prefix of
    each of the 2b videos runs once, with the suffixes of the video's three captions packed after it.

    Returns name -> (b,) tensor: "rr" = (V^r, t^r), "rs" = (V^r, t^s), "ss" = (V^s, t^s),
    "sr" = (V^s, t^r), "r'" = (V^r, t'), "s'" = (V^s, t'). t' on a video is that video's OWN
    caption (t^r on V^r, t^s on V^s) with the words outside LCS(t^r, t^s) hidden from attention, as
    the released code masks the video's own caption; the visible words are the same on both."""
    where = {p: k for k, p in enumerate(paths)}
    pairs = [("rr", "real", "caption"), ("rs", "real", "neg")]  # Eq. (2)
    if args.use_syn:
        pairs += [("ss", "syn", "neg"), ("sr", "syn", "caption")]  # Eq. (5)
        if args.use_scr:
            pairs += [("r'", "real", "caption"), ("s'", "syn", "neg")]  # Eq. (6)
    captions, index, hidden = [], [], []
    for name, video, text in pairs:
        other = "neg" if text == "caption" else "caption"
        for r in batch:
            captions.append(r[text])
            index.append(where[r[video]])
            hidden.append(common.hidden_word_spans(r[text], r[other]) if name.endswith("'") else None)
    a = common.alignment_logits(model, processor, frames, captions, index, hidden, prompt=args.prompt)  # (len(pairs) * b,)
    return dict(zip([p[0] for p in pairs], a.view(len(pairs), len(batch))))


def objective(a, w, args):
    """Eq. (7) and its terms from triplet_logits' output; w: (b,) weights phi."""
    zero = a["rr"].new_zeros(())
    # ---- §3 Eq. (2): real videos, positive vs LLM-written negative caption ----
    l_real = common.loss_real(a["rr"], a["rs"])
    # ---- §5 Eq. (5): weighted synthetic loss (w = 1 is Eq. 3) ----
    l_syn = common.loss_syn_weighted(a["ss"], a["sr"], w) if "ss" in a else zero
    # ---- §5 Eq. (6): f(own) > f(t') > f(other) on both videos; column 0 = V^s, column 1 = V^r ----
    l_scr = zero
    if "s'" in a:
        f = {k: torch.sigmoid(v) for k, v in a.items()}  # Eq. (1)
        l_scr = common.loss_scr(torch.stack([f["ss"], f["rr"]], 1), torch.stack([f["s'"], f["r'"]], 1),
                                torch.stack([f["sr"], f["rs"]], 1), w, args.gamma)
    # ---- §5 Eq. (7): L = L_real + L_syn^phi + lambda_scr L_scr^phi ----
    return dict(zip(TERMS, (common.total_loss(l_real, l_syn, l_scr, args.lambda_scr), l_real, l_syn, l_scr)))


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
    # ---- data: the same global batches for any number of processes ----
    rows, skipped = load_triplets(args)
    if min(args.batch_size, args.micro_batch_size) < 1:
        raise ValueError(f"--batch_size {args.batch_size} and --micro_batch_size {args.micro_batch_size}: both must be >= 1")
    accum, rest = divmod(args.batch_size, args.micro_batch_size * dist.world_size)
    if rest or not accum:
        raise ValueError(f"--batch_size {args.batch_size} is not a multiple of --micro_batch_size "
                         f"{args.micro_batch_size} x {dist.world_size} processes")
    per_epoch = len(rows) // args.batch_size
    if per_epoch == 0:
        raise ValueError(f"{args.train_csv}: {len(rows)} usable rows, fewer than one --batch_size {args.batch_size}")
    total = per_epoch * args.num_epochs
    if total == 1 and args.warmup_steps > 0:  # the linear warm-up starts at lr 0: nothing would train
        raise ValueError(f"1 optimizer step with --warmup_steps {args.warmup_steps}: it runs at lr 0 and the adapter "
                         f"would stay untrained; pass --warmup_steps 0 (or more rows / --num_epochs)")
    stop = min(total, args.max_steps) if args.max_steps else total
    # what a checkpoint was made with: the CSV's content and every setting that changes the weights
    plan = {**asdict(args), "train_csv": common.file_hash(args.train_csv), "rows": len(rows)}
    plan = {k: v for k, v in plan.items() if k not in RUN_ONLY}
    log_path = os.path.join(args.out_dir, "log.jsonl")
    common.print0(f"{len(rows)} rows ({len(skipped)} skipped, listed in skipped.csv), {total} steps of "
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
        common.write_csv(os.path.join(args.out_dir, "skipped.csv"), skipped, ["line", "videopath", "reason"])
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
        rows, batch_sampler=[mb for s in range(start, stop) for mb in micro_batches(len(rows), s, accum, dist, args)],
        collate_fn=functools.partial(load_videos, args=args), num_workers=args.num_workers,
        worker_init_fn=functools.partial(die_with, os.getpid()))
    batches = iter(loader)
    for step in range(start, stop):
        t0, lr = time.time(), scheduler.get_last_lr()[0]
        sums = torch.zeros(len(TERMS), device=dist.device)
        for j in range(accum):
            batch, paths, frames = next(batches)
            torch.manual_seed(common.example_seed(args.seed, step, *[r["index"] for r in batch]))  # LoRA dropout
            w = torch.tensor([r["w"] for r in batch], device=dist.device)
            last = j == accum - 1  # gradients are all-reduced only on the last micro-step
            with contextlib.nullcontext() if ddp is None or last else ddp.no_sync():
                with torch.autocast("cuda", torch.bfloat16, enabled=cuda and args.bf16):
                    terms = objective(triplet_logits(net, processor, batch, paths, frames, args), w, args)
                if not all(torch.isfinite(v) for v in terms.values()):
                    raise FloatingPointError(
                        f"step {step + 1}: non-finite loss {({k: v.item() for k, v in terms.items()})} on rows "
                        f"{[r['index'] for r in batch]} of {args.train_csv} (videos {paths})")
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
            line = dict(step=step + 1, epoch=step // per_epoch, **dict(zip(TERMS, sums.tolist())), lr=lr,
                        grad_norm=grad_norm.item(), samples_per_s=args.batch_size / (time.time() - t0))
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
