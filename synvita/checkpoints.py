"""03_train.py's out_dir: the check that a new run does not mix with an earlier one, args.json and
skipped.csv, the log kept up to a resumed step, checkpoints (the LoRA weights, AdamW's state, the
schedule, the step) written atomically and resumed only with the same settings, and the adapter."""
import glob
import json
import os
import re
from dataclasses import asdict

import torch

from synvita import disk, runs
from synvita.runs import UserError

RUN_ONLY = ("out_dir", "resume", "max_steps", "num_workers", "cache_videos", "save_every",
            "gradient_checkpointing", "dist_timeout")  # no effect on weights: a --resume may change them


# ---- out_dir: settings, checkpoints (LoRA weights, optimizer, scheduler, step), the adapter ----
def checkpoint_settings(args, items):
    """What a checkpoint is made with: every setting that changes the weights (not RUN_ONLY), the
    CSVs' content (sha256; one per --train_csv, in order) and the item count. --resume refuses a
    checkpoint with other settings."""
    # the CSVs by content, not by path: a changed weight column must not resume an older run
    hashes = [disk.file_hash(path) for path in args.train_csv]  # another list of CSVs is another run
    settings = {**asdict(args), "train_csv": hashes[0] if len(hashes) == 1 else hashes, "items": len(items),
                "feedback_csv": disk.file_hash(args.feedback_csv) if args.feedback_csv else ""}
    if not args.syn_types:  # as a checkpoint written before --syn_types existed records it: absent
        del settings["syn_types"]
    if args.schedule == "cosine":  # likewise before --schedule (cosine was the only decay)
        del settings["schedule"]
    return {k: v for k, v in settings.items() if k not in RUN_ONLY}


RUN_FILES = ("adapter", "log.jsonl", "checkpoints/step_*.pt")  # what shows that out_dir holds a run


def check_out_dir(args):
    """Refuse a new run (no --resume) in a folder that holds a run: its adapter, log or checkpoint
    would be mixed with, or replaced by, a run that may yet stop on a bad input. Nothing is touched."""
    found = [name for name in RUN_FILES if glob.glob(os.path.join(glob.escape(args.out_dir), name))]
    if found and not args.resume:
        raise UserError(f"{args.out_dir} holds a run ({', '.join(found)}): pass --resume to continue it, "
                        f"another --out_dir, or delete it")


def start_out_dir(args, skipped, start, dist):
    """Rank 0, only once every check has passed and the model has loaded (so that a bad flag or input
    touches nothing): writes args.json and skipped.csv, and keeps the log lines up to step `start`
    (a resumed run: those after it are logged again; the lines a killed run wrote after its checkpoint)."""
    if not dist.master:  # one writer: the other ranks' files would be the same bytes
        return
    log_path = os.path.join(args.out_dir, "log.jsonl")  # one line per optimizer step (training.log_step)
    logged = resume_log(log_path) if os.path.exists(log_path) else None  # read first: a bad line writes nothing
    os.makedirs(args.out_dir, exist_ok=True)  # only now: every check has passed
    record = asdict(args)  # Args(**record) gives these settings back
    if len(args.train_csv) == 1:  # one CSV as a path, as args.json held it before --train_csv took several
        record["train_csv"] = args.train_csv[0]
    disk.save_json(os.path.join(args.out_dir, "args.json"), record)  # the settings the run was made with
    # every row not trained on and every triplet trained without its twin V^s, each with the reason
    disk.write_csv(os.path.join(args.out_dir, "skipped.csv"), skipped, ["file", "line", "videopath", "reason"])
    if logged is not None:  # every kept line ends with a newline, so the next step appends a line of its own
        with disk.atomic_path(log_path) as tmp, open(tmp, "w", encoding="utf-8") as fh:  # a kill keeps the old log
            fh.writelines(text + "\n" for step, text in logged if step <= start)  # the later steps run again


def resume_log(path):
    """log.jsonl's lines as [(step, text)]. A last line cut short (a kill or a full disk mid-write) is
    dropped, named in one printed line; a line before it that is not a log line stops the run, naming
    log.jsonl:line (it was not cut by a write: the file was changed)."""
    lines = open(path, encoding="utf-8", errors="replace").read().splitlines()  # a cut UTF-8 character: U+FFFD
    logged = []
    for n, text in enumerate(lines, 1):  # n: the file's line, as an editor shows it
        try:
            logged.append((json.loads(text)["step"], text))  # the text itself is kept: the same bytes again
        except (ValueError, KeyError, TypeError):  # not JSON, or JSON without a step
            if n < len(lines):  # a write cuts only the last line: an earlier one was edited
                raise UserError(f"{path}:{n}: not a line of this log ({text[:40]!r}); delete that line, "
                                f"or pass another --out_dir") from None
            runs.print0(f"{path}:{n}: its last line was cut short (a kill or a full disk?); dropped: {text[:40]!r}")
    return logged


def save_checkpoint(args, step, settings, model, optimizer, scheduler):
    """Write out_dir/checkpoints/step_NNNNNNN.pt atomically, then delete the older ones."""
    path = os.path.join(args.out_dir, "checkpoints", f"step_{step:07d}.pt")  # zero-padded: sorted names, sorted steps
    lora = {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad}  # the LoRA weights only
    with disk.atomic_path(path) as tmp:  # the key "plan" holds the settings (the name older checkpoints use)
        torch.save(dict(step=step, plan=settings, lora=lora, optimizer=optimizer.state_dict(),
                        scheduler=scheduler.state_dict()), tmp)
    for old in glob.glob(os.path.join(args.out_dir, "checkpoints", "step_*.pt")):  # after the new one is whole
        if old != path:
            os.remove(old)  # only the latest is kept (a LoRA + AdamW state of a 7B model is ~1 GB)


def latest_checkpoint(args, dist):
    """The checkpoint every rank resumes from: the latest that rank 0 sees (None: none), the same path
    on every rank (a node's stale view of a shared folder would start its ranks at another step, and
    the collectives would pair different steps); a rank that cannot read it names the folder."""
    paths = sorted(glob.glob(os.path.join(args.out_dir, "checkpoints", "step_*.pt")))  # the last: the latest step
    # not step_N.tmp<pid>.pt: a kill while rank 0 wrote a checkpoint leaves that half-written file
    paths = [p for p in paths if re.fullmatch(r"step_\d+\.pt", os.path.basename(p))]
    chosen = [paths[-1] if paths else None]
    if dist.world_size > 1:  # rank 0's choice, on every node
        torch.distributed.broadcast_object_list(chosen, src=0)
    if chosen[0] and not os.path.exists(chosen[0]):
        raise UserError(f"{chosen[0]}: rank {dist.rank} cannot read the checkpoint rank 0 resumes from: "
                        f"--out_dir must be on a file system that every node shares")
    return chosen[0]


def load_checkpoint(args, settings, model, optimizer, scheduler, dist):
    """Restore the latest checkpoint (latest_checkpoint: every rank the same); returns the step to
    continue from (0 if there is none).

    No RNG state needs restoring: the only randomness after the LoRA initialisation is the LoRA
    dropout, reseeded at every micro-step from (seed, step, rows), and the epoch shuffles, seeded
    from (seed, epoch); the data position is the step number itself."""
    if not (path := latest_checkpoint(args, dist)):  # killed before its first checkpoint: the run starts again
        runs.print0(f"--resume: no checkpoint in {args.out_dir}/checkpoints, starting from step 0")
        return 0
    state = torch.load(path, map_location="cpu", weights_only=True)  # tensors and plain data only
    if differ := disk.settings_diff(state["plan"], settings):  # else the weights would mix two set-ups
        raise UserError(f"{path}: written with other settings ({differ}); resume with the same settings")
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:  # only the LoRA weights are saved; the frozen rest comes from --model
                p.copy_(state["lora"][n])
    optimizer.load_state_dict(state["optimizer"])  # AdamW's moments: the next step as if never stopped
    scheduler.load_state_dict(state["scheduler"])  # the warm-up and cosine decay go on from this step
    runs.print0(f"resumed from {path} (step {state['step']})")
    return state["step"]


def save_adapter(args, model, dist):
    """Rank 0: the LoRA adapter (peft save_pretrained) written aside, then renamed to out_dir/adapter
    (disk.atomic_path), so that no reader meets half an adapter and a full disk keeps the old one."""
    if not dist.master:  # DDP keeps the ranks' LoRA weights equal: rank 0's are everyone's
        return
    final = os.path.join(args.out_dir, "adapter")  # what 04_eval.py --adapter loads
    with disk.atomic_path(final) as tmp:
        model.save_pretrained(tmp)  # peft: adapter_config.json and the LoRA tensors
    runs.print0(f"saved {final}")
