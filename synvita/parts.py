"""Per-rank part files: the one protocol of 02_weight.py's score cache and 04_eval.py's scores.

Each rank appends what it has done to a file of its own, one JSON record a line, flushed as it
goes, so a kill loses at most the record being written. A rerun, with any number of ranks, reads
every rank's complete records and does only the rest: a record counts only if its line is whole,
and the torn record a kill may leave after the last whole one is cut off before the file grows
again. When its work is done a rank writes its `finished` marker; rank 0 waits for every marker
(files, not a collective: ranks may finish hours apart, past any collective's timeout), as long
as the ranks' part files show progress (--dist_timeout). The part files carry the global rank and
need only a file system that every node shares.
"""
import contextlib
import glob
import json
import os

import torch

from synvita.disk import atomic_path, naming_write_errors, save_json
from synvita.runs import wait_for_files


def read_records(path, valid=lambda record: True):
    """The whole records of a part file, in order, and the number of their bytes. A record counts if
    its line ends with a newline, parses as JSON and passes `valid`; the first line that does not
    ends the file: a kill or a full disk may cut it at any byte (inside a caption, a CRLF or a UTF-8
    character). Record k (from 0) is the file's line k + 1."""
    records, end = [], 0
    with open(path, "rb") as fh:  # bytes: a cut may fall inside a UTF-8 character
        for raw in fh:
            try:
                record = json.loads(raw) if raw.endswith(b"\n") else None
            except ValueError:  # JSON or UTF-8 cut short
                record = None
            if record is None or not valid(record):
                break  # a torn record: appending() cuts the file here before it grows again
            records.append(record)
            end += len(raw)  # the bytes up to here are whole records
    return records, end


@contextlib.contextmanager
def appending(path, valid=lambda record: True):
    """This rank's part file, open to append a record a line (created if missing). A torn record left
    after the last whole one (read_records, with the same `valid`) is cut off first, atomically, so
    every later record starts on a line of its own. A full disk or a read-only folder names the file."""
    with naming_write_errors(path):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        if os.path.exists(path) and (end := read_records(path, valid)[1]) < os.path.getsize(path):
            whole = open(path, "rb").read()[:end]  # the records before the tear
            with atomic_path(path) as tmp, open(tmp, "wb") as fh:
                fh.write(whole)
        with open(path, "a", encoding="utf-8") as fh:
            yield fh


def clear_finished(pattern, dist):
    """Before any rank works: rank 0 removes an earlier run's `finished` markers (a glob pattern), then
    the ranks meet once, so that no rank's marker of this run can be taken for an old one."""
    if dist.master:
        for marker in glob.glob(pattern):
            os.remove(marker)
    if dist.world_size > 1:  # the ranks start a moment apart: the one collective of the protocol
        torch.distributed.barrier()


def finish(marker, payload=None):
    """This rank's work is done: its marker holds `payload` (JSON, e.g. the videos it could not read)."""
    save_json(marker, payload)


def wait_for_all(markers, timeout=None, watch=()):
    """Rank 0: wait until every rank's marker exists, then their payloads, in order. Polled: ranks may
    finish hours apart; `timeout` seconds with no new marker and no change to a file of `watch` (glob
    patterns of the ranks' part files) stop it (runs.wait_for_files: a rank that died on another node)."""
    wait_for_files(markers, timeout=timeout, watch=watch)
    return [json.load(open(marker, encoding="utf-8")) for marker in markers]
