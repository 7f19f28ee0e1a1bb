"""The machinery of 03_train.py's training loop (§6): the batch plan (micro-batches of whole triplets,
the same global batches for any process count, a resume needing only the step), the DataLoader
workers that decode the next micro-batches' videos, the micro-step (forward, Eq. 7, backward) and
the log of each optimizer step."""
import contextlib
import functools
import json
import os
import signal
import sys
import time
from collections import Counter, deque

import torch

from synvita import disk, runs, triplets, video_io
from synvita.runs import UserError

# ---- batching: micro-batches of whole triplets, the same global batches for any process count ----
def micro_batch_plan(items, args, dist):
    """Every epoch's micro-batches (the plan), the micro-batches each process accumulates per optimizer
    step (accum), and the number of optimizer steps (total). Refuses settings that cannot make
    --batch_size, or that leave nothing to train."""
    check_batch(args, dist)
    accum = args.batch_size // (args.micro_batch_size * dist.world_size)  # --batch_size = world x accum x micro
    plan = [epoch_micro_batches(items, e, args) for e in range(args.num_epochs)]  # every epoch, drawn up front
    per_global = accum * dist.world_size  # micro-batches in one global batch
    total = sum(len(e) // per_global for e in plan)  # each epoch's tail that fills no global batch is dropped
    if total == 0:
        raise UserError(f"{triplets.csv_names(args)}: {sum(it['rows'] for it in items)} usable rows, fewer than one "
                        f"--batch_size {args.batch_size}")
    if total == 1 and args.warmup_steps > 0:  # the linear warm-up starts at lr 0: nothing would train
        raise UserError(f"1 optimizer step with --warmup_steps {args.warmup_steps}: it runs at lr 0 and the adapter "
                        f"would stay untrained; pass --warmup_steps 0 (or more rows / --num_epochs)")
    return plan, accum, total


def check_batch(args, dist):
    """--batch_size = processes x accum x --micro_batch_size released rows, and a micro-batch holds
    whole triplets (a triplet's Yes and No rows share its two videos: 2 rows) and explanations (1
    row): an odd --micro_batch_size could not be filled by triplets, and its steps would train fewer
    rows than the plan and log.jsonl say. Refused before any work, naming the sizes that work."""
    b, m, n = args.batch_size, args.micro_batch_size, dist.world_size
    if m % 2 == 0 and b % (m * n) == 0:
        return
    fits = [str(k) for k in range(2, b // n + 1, 2) if b % (k * n) == 0]  # even sizes that make --batch_size
    said = " or ".join([", ".join(fits[:-1]), fits[-1]] if len(fits) > 1 else fits)  # "2, 4 or 8"
    works = f"--micro_batch_size {said} works" if fits else f"none can: give a --batch_size that is a multiple of 2 x {n}"
    why = "is odd (a triplet is 2 rows, kept together)" if m % 2 else f"x {n} does not divide {b}"
    raise UserError(f"--batch_size {b}, --micro_batch_size {m}, {runs.plural(n, 'process')}: {m} {why}; {works}")


def pack(order, sizes, m):
    """Cut a shuffled `order` of items into micro-batches of exactly m released rows (m even: check_batch):
    a triplet counts 2 (its Yes and No rows, kept together so that they share their two videos), an
    explanation 1. An item that does not fit what is left of a micro-batch waits for the next one, and
    the next item that fits fills the gap. An odd count of explanations leaves the order's last one
    out (with it every micro-batch uses an even count, so none is one row short: each step trains the
    rows it logs); the tail that fills no micro-batch is dropped too (drop_last)."""
    ones = [i for i in order if sizes[i] == 1]  # the explanations, in the shuffled order
    queue = deque(i for i in order if len(ones) % 2 == 0 or i != ones[-1])  # an even count of them
    left, out = Counter(sizes[i] for i in queue), []  # left: items per size still queued
    while queue:
        batch, free, k = [], m, 0  # free: rows left in this micro-batch; k: the queue position looked at
        while free and k < len(queue) and any(left[size] for size in range(1, free + 1)):
            item = queue[k]
            if sizes[item] > free:
                k += 1  # it waits at the front for the next micro-batch
                continue
            del queue[k]  # it fits: into this micro-batch
            left[sizes[item]] -= 1
            batch.append(item)
            free -= sizes[item]  # 2 rows for a triplet, 1 for an explanation
        if free:  # the queue ran out: the tail is dropped (drop_last)
            break
        out.append(batch)
    return out


def epoch_micro_batches(items, epoch, args):
    """Every micro-batch of epoch `epoch`: a permutation of the items seeded by (seed, epoch), the
    same on every rank (as DistributedSampler.set_epoch does), packed into micro-batches of
    --micro_batch_size released rows."""
    g = torch.Generator().manual_seed(runs.example_seed(args.seed, "epoch", epoch))  # a resume redraws it
    return pack(torch.randperm(len(items), generator=g).tolist(), [it["rows"] for it in items], args.micro_batch_size)


def micro_batches(plan, step, accum, dist):
    """This rank's `accum` micro-batches for optimizer step `step`. plan: per epoch, its micro-batches.

    A global batch is world_size x accum consecutive micro-batches (batch_size released rows; a tail
    that fills no global batch is dropped, drop_last); rank r takes micro-batches r*accum ...
    r*accum + accum - 1 of it. The micro-batches do not depend on the number of processes, so the
    global batches are the same for any number of processes, and a resume needs only the step."""
    per_global = accum * dist.world_size  # micro-batches in one global batch
    for epoch in plan:
        if step < len(epoch) // per_global:  # the step falls in this epoch
            first = step * per_global + dist.rank * accum  # this rank's first micro-batch of the step
            return epoch[first: first + accum]
        step -= len(epoch) // per_global  # the step's index within the later epochs
    raise IndexError(f"step {step} is past the end of the plan")  # a bug: main stops at the plan's total


# ---- DataLoader workers: the videos of the next micro-batches, decoded in other processes ----
def video_loader(items, plan, start, stop, accum, args, dist):
    """A DataLoader over this rank's micro-batches of steps start ... stop - 1, in order, each as
    load_videos' (batch, paths, frames), decoded by --num_workers processes ahead of the training."""
    return torch.utils.data.DataLoader(
        # batch_sampler: the micro-batches in training order, each a list of positions in `items`
        items, batch_sampler=[mb for s in range(start, stop) for mb in micro_batches(plan, s, accum, dist)],
        collate_fn=functools.partial(load_videos, args=args, cache={} if args.cache_videos else None),
        num_workers=args.num_workers,  # 0: decoded in this process, between micro-steps
        worker_init_fn=functools.partial(die_with, os.getpid()))


def load_videos(batch, args, cache=None):
    """DataLoader collate (runs in a worker): decode each distinct video of a micro-batch once; with
    a `cache` (a dict: --cache_videos) each video only the first time this process meets it. A video
    that cannot be decoded comes back as its UserError in place of the frames (micro_step raises it):
    raised in a worker, it would reach the training process wrapped in the worker's traceback."""
    # V^r of every item, then every twin V^s (Table 5's "ALL": one per generator), each with its row
    where = {p: r for r in reversed(batch) for p in [r["real"]] + [syn for syn, _ in triplets.twins(r)]}
    paths = list(dict.fromkeys([r["real"] for r in batch] + [syn for r in batch for syn, _ in triplets.twins(r)]))
    frames = {} if cache is None else cache  # without a cache: this micro-batch's videos alone
    try:
        for p in paths:
            if p not in frames:  # each distinct video once: V^r serves rr, rs, r'; V^s serves ss, sr, s'
                frames[p] = decode(p, where[p], args)
    except UserError as e:
        return batch, paths, e  # handed on, raised by micro_step in the training process
    return batch, paths, [frames[p] for p in paths]  # (T, H, W, 3) uint8 each, in the order of paths


def decode(path, item, args):
    """video_io.read_video, where a video that cannot be read stops the run as a user's error naming
    the row of `item` (its file and line)."""
    try:  # --num_frames frames, sampled as --frame_sampling says (Video-LLaVA's uniform by default)
        return video_io.read_video(path, args.num_frames, args.frame_sampling)
    except (OSError, ValueError) as e:  # read_video names the file and what failed
        raise UserError(f"{item['file']}:{item['line']}: {e}") from None


def die_with(parent, worker_id):
    """DataLoader worker_init_fn: the kernel ends this worker when the training process dies, even
    by SIGKILL (Linux prctl PR_SET_PDEATHSIG). Without it, workers outlived a killed run (~0.5 GB
    each): PyTorch's own parent check does not reach a worker that is stuck elsewhere."""
    if sys.platform.startswith("linux"):  # prctl is Linux's; elsewhere only the parent check below
        import ctypes
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the training process died before prctl took effect
        os._exit(1)


# ---- the training loop's steps ----
def print_data(items, skipped, total, accum, args, dist):
    """One printed line: what trains (triplets, explanations), what skipped.csv lists (each row once)
    by problem (the reader's, a missing video, a prompt too long) and the rows whose twin is not
    used, the same counts as the file; and the global batches."""
    kept = sum(r["kind"] == "triplet" for r in items)  # the triplets
    no_twin = sum(s["reason"].startswith(triplets.NO_TWIN) for s in skipped)  # trained, their twin V^s not
    problems = Counter(s["reason"].split(":")[0] for s in skipped if not s["reason"].startswith(triplets.NO_TWIN))
    by_problem = f" ({', '.join(f'{k}: {n}' for k, n in sorted(problems.items()))})" if problems else ""
    alone = " (on L_real alone)" if len(args.train_csv) == 1 else ""  # else a twin of another CSV may train
    but = " (not the twins --syn_types leaves out, counted above)" if args.syn_types else ""  # Table 2's
    runs.print0(f"{runs.plural(kept, 'triplet')} and {runs.plural(len(items) - kept, 'explanation')} train; "
                f"skipped.csv lists {runs.plural(len(skipped), 'row')}: {sum(problems.values())} skipped{by_problem}, "
                f"{no_twin} trained without their twin V^s{alone}{but}. "
                f"{runs.plural(total, 'step')} of {args.batch_size} rows = {runs.plural(dist.world_size, 'process')} "
                f"x {runs.plural(accum, 'micro-batch')} x {args.micro_batch_size}")


def lr_schedule(optimizer, args, total):
    """§6's learning rate: --warmup_steps of linear warm-up, then --schedule's decay to 0 at step `total`
    (cosine: the released Video-LLaVA recipe; linear: the Trainer's default, the released mPLUG-Owl one)."""
    from transformers import get_cosine_schedule_with_warmup, get_linear_schedule_with_warmup
    decay = get_cosine_schedule_with_warmup if args.schedule == "cosine" else get_linear_schedule_with_warmup
    return decay(optimizer, args.warmup_steps, total)


def micro_step(forward, loss_fn, ddp_model, processor, loaded, step, last, accum, args, dist):
    """One micro-batch's forward (every pair in one call: forward, 03_train.py's micro_batch_pairs, then
    loss_fn: its objective, Eq. 7, or the released loss) and backward of loss / accum. loaded:
    load_videos' (batch, paths, frames); last: the step's last micro-batch, whose backward all-reduces
    the gradients. Returns the terms' values in loss_fn's order (03_train.py's TERMS), (len(TERMS),)
    float32, detached."""
    batch, paths, frames = loaded
    if isinstance(frames, UserError):  # a video of the micro-batch could not be decoded (load_videos)
        raise frames  # here, in the training process: one line naming the row, no worker traceback
    # the LoRA dropout's seed comes from the step and the rows, not the process: any rank count draws the same
    torch.manual_seed(runs.example_seed(args.seed, step, *[(r["kind"], r["line"]) for r in batch]))
    # gradients are all-reduced only in the last micro-step's backward; the others accumulate locally
    with contextlib.nullcontext() if dist.world_size == 1 or last else ddp_model.no_sync():
        # bf16 on GPU (--bf16); Eq. (1)'s logits are computed in float32 all the same (shared_prefix.answer_logits)
        with torch.autocast("cuda", torch.bfloat16, enabled=dist.device.startswith("cuda") and args.bf16):
            terms = loss_fn(forward(ddp_model, processor, batch, paths, frames, args), batch, args)
        if not all(torch.isfinite(v) for v in terms.values()):  # stop at once, naming the rows to look at
            raise FloatingPointError(
                f"step {step + 1}: non-finite loss {({k: v.item() for k, v in terms.items()})} on "
                f"lines {[(r['kind'], r['line']) for r in batch]} of {triplets.csv_names(args)} / {args.feedback_csv} "
                f"(videos {paths})")
        (terms["loss"] / accum).backward()  # the step's gradient: the mean over its micro-batches
    return torch.stack([v.detach().float() for v in terms.values()])  # TERMS: the order loss_fn returns them in


def log_step(terms, sums, step, lr, grad_norm, t0, accum, args, dist):
    """Average each of `terms` (03_train.py's TERMS, the names) over the global batch (every process and
    micro-step); rank 0 appends the line to log.jsonl and prints it. sums: this process's sums over
    its micro-steps, (len(terms),)."""
    if dist.world_size > 1:
        torch.distributed.all_reduce(sums)  # sum over the processes
    sums /= accum * dist.world_size  # the sums over all micro-batches of the step -> their means
    if dist.master:
        line = dict(step=step + 1, **dict(zip(terms, sums.tolist())), lr=lr,
                    grad_norm=grad_norm.item(), rows_per_s=args.batch_size / (time.time() - t0))
        path = os.path.join(args.out_dir, "log.jsonl")  # appended a line a step: a kill loses at most one
        with disk.naming_write_errors(path), open(path, "a", encoding="utf-8") as fh:  # a full disk names it
            fh.write(json.dumps(line) + "\n")  # a line cut by a kill or a full disk: checkpoints.resume_log drops it
        runs.print0(" ".join(f"{k} {v:.4g}" for k, v in line.items()))  # the same line, short, on stdout
