"""A stage's run: its entry point and flags (a user's mistake is one line), torchrun's ranks, seeds,
printing on rank 0, and rank 0 waiting for the other ranks' files."""
import hashlib
import os
import sys
from dataclasses import dataclass

import numpy as np
import torch

from common import UserError  # defined beside the prompts that raise it; every stage raises it too

__all__ = ["UserError", "run_stage", "parse_args", "check_numbers", "DIST_TIMEOUT", "Dist", "setup_distributed", "plural", "print0",
           "seed_everything", "example_seed", "shard", "progress", "wait_for_files", "files_state"]


# ---- a user's mistake: one line and exit status 2, no traceback ---------------------------------
def run_stage(main, args_class, resume_flag=""):
    """A stage's entry point: parse the flags (choices and numbers checked before any work), run
    main(args), and turn a UserError into one line on stderr and exit status 2, and Ctrl-C into one
    line and exit status 130 (the shell's for SIGINT): every stage resumes from what it wrote, with
    the same command (+ resume_flag, e.g. 03's --resume)."""
    try:
        main(parse_args(args_class))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    except KeyboardInterrupt:  # a user's Ctrl-C (torchrun passes it to every rank): no traceback
        if int(os.environ.get("RANK", 0)) == 0:
            print(f"stopped: {os.path.basename(sys.argv[0])} was interrupted; the work on disk is kept, "
                  f"and the same command{' with ' + resume_flag if resume_flag else ''} goes on from it", file=sys.stderr, flush=True)
        sys.exit(130)

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
    args = cls(**vars(parser.parse_args(argv)))
    check_numbers(args, getattr(cls, "POSITIVE", ()))
    return args

def check_numbers(args, positive=()):
    """Every numeric flag, before any work: a finite number, never negative (no flag of any stage
    means anything below 0; 0 is "the default" or "none" where its --help says so), and above 0 for
    those named in the Args' POSITIVE (a count of rows or steps, a rate). A UserError names the flag."""
    import dataclasses
    import math
    for f in dataclasses.fields(args):
        value = getattr(args, f.name)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if not math.isfinite(value):  # nan, inf: argparse's float() takes them
            raise UserError(f"--{f.name} {value}: give a finite number")
        if value < 0 or (value == 0 and f.name in positive):
            raise UserError(f"--{f.name} {value}: give a number " + (">= 1" if f.name in positive and isinstance(value, int)
                                                                     else "> 0" if f.name in positive else ">= 0"))


# ---- torchrun, seeds, printing -------------------------------------------------------------------
DIST_TIMEOUT = 1800  # the stages' default --dist_timeout, in seconds: gloo's own default, 3x NCCL's

@dataclass
class Dist:
    rank: int = 0  # global: RANK, over every node
    local_rank: int = 0  # on this node: LOCAL_RANK, which picks the GPU
    world_size: int = 1
    device: str = "cpu"
    master: bool = True  # global rank 0 prints, merges and saves: the one writer of shared files
    timeout: float = DIST_TIMEOUT  # seconds (--dist_timeout): torch.distributed's, and rank 0's wait_for_files

def setup_distributed(timeout=DIST_TIMEOUT):
    """Read torchrun's RANK / LOCAL_RANK / WORLD_SIZE; nccl on GPU, gloo on CPU, on one node or
    several (torchrun's c10d rendezvous). Plain `python` (no RANK) gives a single process and no
    process group. timeout (seconds, a stage's --dist_timeout): how long a rank waits in a collective
    for another rank before torch.distributed stops it (a lost node must not hang the others)."""
    cuda = torch.cuda.is_available()
    if "RANK" not in os.environ:  # plain `python`: one process, no process group
        return Dist(device="cuda" if cuda else "cpu", timeout=timeout)
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
        import datetime  # one value, the flag's, for NCCL (its default: 10 min) and gloo (30 min)
        torch.distributed.init_process_group(backend="nccl" if cuda else "gloo",
                                             timeout=datetime.timedelta(seconds=timeout))
    return Dist(rank, local_rank, world, f"cuda:{local_rank}" if cuda else "cpu", rank == 0, timeout)

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

def wait_for_files(paths, every=2.0, timeout=None, watch=()):
    """Rank 0 waits until every path exists (the other ranks' outputs, or their "finished" markers).

    NOTE: it polls the file system instead of calling a barrier: a collective times out (NCCL's
    default is 10 minutes) while another rank still works on its last items. A rank that dies on
    another node is not seen by this node's torchrun, so the wait is bounded by progress instead:
    after `timeout` seconds (--dist_timeout) in which no awaited path appeared and no file matching
    a `watch` pattern (the other ranks' part files) changed, a UserError names what is missing."""
    import time
    pending, wait, seen, since = list(paths), 0.05, None, time.monotonic()
    while pending:
        pending = [p for p in pending if not os.path.exists(p)]
        if not pending:
            return
        now = (len(pending), files_state(watch))  # what the other ranks have done so far
        if now != seen:
            seen, since = now, time.monotonic()
        elif timeout and time.monotonic() - since > timeout:
            raise UserError(f"rank 0 waited {timeout:g} s (--dist_timeout) with no progress from the other ranks for "
                            f"{plural(len(pending), 'file')}, e.g. {pending[0]}: a rank died (a lost node?) or hangs. "
                            f"The work on disk is kept: relaunch the same command to resume")
        time.sleep(wait)  # looked at again soon, then less and less often, at most every `every` seconds
        wait = min(2 * wait, every)

def files_state(patterns):
    """(path, size, mtime) of every file matching the glob patterns: it changes when a rank writes."""
    import glob
    state = []
    for path in sorted({p for pattern in patterns for p in glob.glob(pattern)}):
        try:
            stat = os.stat(path)
        except FileNotFoundError:  # renamed or removed since it was listed (an atomic write's temporary)
            continue
        state.append((path, stat.st_size, stat.st_mtime_ns))
    return state
