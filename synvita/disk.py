"""Files: the one reader of every stage's input CSV, atomic writes that name a full disk, and the
settings-checked resume that keeps a rerun from mixing two runs' work."""
import contextlib
import csv
import errno
import hashlib
import io
import json
import os
import shutil

from synvita.runs import UserError, print0


# ---- CSV in ----------------------------------------------------------------------------------------
class Rows(list):
    """read_csv's rows (dicts), with `lines` (each row's physical line in the file; the header is
    line 1) and `skipped` ({problem: [lines]}, the rows left out)."""

    def where(self, wanted):
        """The rows for which wanted(line, row) is true, each still beside its line; the same `skipped`."""
        keep = [wanted(line, r) for line, r in zip(self.lines, self)]
        kept = Rows(r for r, k in zip(self, keep) if k)
        kept.lines, kept.skipped = [line for line, k in zip(self.lines, keep) if k], self.skipped
        return kept

def read_csv(path, required=(), texts=()):
    """The one reader of every stage's input CSV: rows as dicts, checked, with physical line numbers.

    - a missing file or column, a byte that is not UTF-8, or a header with no row: an error naming
      the file (and the line of the bad byte);
    - a row with more or fewer fields than the header, or an empty `texts` column: skipped, named
      by file:line and counted (Rows.skipped);
    - an exact duplicate of an earlier row: dropped, named and counted (the same row twice would be
      generated, weighted, trained on or scored twice).
    Lines are the file's physical lines, so a quoted caption that spans lines moves the next row's
    number as an editor shows it. Blank lines are ignored."""
    if not os.path.exists(path):
        raise UserError(f"{path}: no such CSV file")
    data = open(path, "rb").read()
    try:
        text = data.decode("utf-8-sig")  # a BOM (a spreadsheet's export) is not part of the header
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1  # the physical line of the first bad byte
        raise UserError(f"{path}:{line}: byte 0x{data[e.start]:02x} is not UTF-8; save the file as UTF-8") from None
    reader = csv.reader(io.StringIO(text, newline=""))  # newline="": quoted captions may span lines
    header = next(reader, None)
    named = [c.strip() for c in header or []]
    if twice := sorted({c for c in named if named.count(c) > 1}):  # a dict row keeps the last, the checks read the first
        raise UserError(f"{path}:1: the header names {', '.join(map(repr, twice))} more than once "
                        f"(columns {', '.join(str(i + 1) for i, c in enumerate(named) if c in twice)}); keep one of each")
    missing = [c for c in required if c not in (header or [])]
    if missing:
        raise UserError(f"{path}: missing column(s) {missing}; found {header}")
    rows, seen, skipped = Rows(), {}, {}
    rows.lines, rows.skipped = [], skipped
    start = reader.line_num + 1  # the physical line where the next record starts
    for fields in reader:
        line, start = start, reader.line_num + 1
        if not fields:
            continue  # a blank line
        # the first problem of a row decides how it is counted
        if len(fields) != len(header):
            kind = f"not {len(header)} fields as in the header"
        elif empty := [c for c in texts if not fields[header.index(c)].strip()]:
            kind = "empty " + " and ".join(empty)
        elif tuple(fields) in seen:
            kind = "exact duplicate of an earlier row"
        else:  # a good row
            seen[tuple(fields)] = line
            rows.append(dict(zip(header, fields)))
            rows.lines.append(line)
            continue
        skipped.setdefault(kind, []).append(line)
    for kind, lines in skipped.items():  # one message per kind of bad row
        print0(f"{path}: {len(lines)} row(s) skipped, {kind}: line(s) {', '.join(map(str, lines[:20]))}"
               + (", ..." if len(lines) > 20 else ""))
    if not rows:
        raise UserError(f"{path}: no usable row" + (f" ({sum(map(len, skipped.values()))} skipped)" if skipped else
                                                     " (only a header)" if header else " (empty file)"))
    return rows

def keep_split(rows, split, path):
    """read_csv's rows of one `split` (e.g. VideoCon's "train"): a model is never weighted or trained
    on the rows it is evaluated on. Values are compared without case or surrounding spaces; a file
    without a `split` column, or split "", keeps every row. The rows left out are counted in one
    printed line; none left is an error naming the file's splits."""
    def wanted(row):  # a row without the column belongs to every split
        return row.get("split", split).strip().lower() == split.strip().lower()
    if not split or all(map(wanted, rows)):
        return rows
    kept = rows.where(lambda _, row: wanted(row))
    splits = sorted({r.get("split", "") for r in rows})
    if not kept:
        raise UserError(f"{path}: no row of --split {split!r}; its splits: {splits}")
    print0(f"{path}: {len(rows) - len(kept)} row(s) of other splits left out (--split {split!r}; its splits: {splits})")
    return kept


# ---- atomic writes out, named when they fail -------------------------------------------------------
# a full disk or quota, a read-only or forbidden folder, a file too big, and a path through a file
# (ENOTDIR) or onto one where a folder goes (EEXIST): a user's output path, named
WRITE_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG,
                errno.ENOTDIR, errno.EEXIST}

# how torch.save's zip writer and safetensors say that the disk is full (no errno to read)
FULL_DISK_WORDS = ("inline_container", "PytorchStreamWriter", "No space left")

@contextlib.contextmanager
def naming_write_errors(path):
    """A write to `path` that fails for want of room or permission (a full disk, a read-only folder)
    stops with a UserError naming the file, which write() itself does not; other errors pass on."""
    try:
        yield
    except OSError as e:
        if e.errno not in WRITE_ERRORS:
            raise
        raise UserError(f"{path}: cannot write it: {e.strerror}") from e
    except Exception as e:  # torch.save's RuntimeError, safetensors' SafetensorError
        if not any(word in str(e) for word in FULL_DISK_WORDS):
            raise
        raise UserError(f"{path}: cannot write it (is the disk full?)") from e

@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary name next to `path`; rename it to `path` only if the block succeeds, so
    a killed run never leaves a truncated file under the final name. The block may write a file or
    a folder there (a folder replaces the old one). A write that fails names the file."""
    root, ext = os.path.splitext(path)
    tmp = f"{root}.tmp{os.getpid()}{ext}"  # keep the extension: writers pick the format by it
    try:
        with naming_write_errors(path):
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            yield tmp
            if os.path.isdir(tmp) and os.path.isdir(path):  # a folder (an adapter): the old one goes
                shutil.rmtree(path)  # a crash here leaves no folder, never half of one
            os.replace(tmp, path)
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp)
        elif os.path.exists(tmp):
            os.remove(tmp)

def check_outputs(outputs, inputs):
    """Before any work: {flag: path} of what a stage writes against {flag: path} of what it reads.
    An output whose folder is an existing file, or that is an input however it is named (a symlink,
    `./`, another spelling of the same file), is a UserError naming both flags: it would be replaced
    mid-run, and the rerun would read its own output as its input."""
    for flag, path in outputs.items():
        if not path:
            continue
        # a flag (or its note, "--out_csv (cache_dir)") that ends in _dir names a folder; others a file
        folder = path if flag.rstrip(")").endswith("_dir") else os.path.dirname(path) or "."
        while not os.path.exists(folder) and os.path.dirname(folder) not in ("", folder):
            folder = os.path.dirname(folder)  # up to the nearest part of the path that exists
        if os.path.exists(folder) and not os.path.isdir(folder):  # makedirs would stop mid-run
            raise UserError(f"{flag} {path}: {folder} is a file, not a folder")
        for name, given in inputs.items():
            for one in given if isinstance(given, (list, tuple)) else [given]:
                if one and os.path.realpath(one) == os.path.realpath(path):
                    raise UserError(f"{flag} {path} is {name} {one}: an output never replaces an input; "
                                    f"pass another {flag.split()[0]}")  # "--out_csv (.json)": the flag

def write_csv(path, rows, fieldnames=None):
    """Write rows (dicts) atomically; columns default to the union of keys in first-seen order."""
    fieldnames = fieldnames or list(dict.fromkeys(k for r in rows for k in r))
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=fieldnames)
        writer.writeheader()
        writer.writerows(rows)

def save_json(path, obj):
    """Write JSON atomically (e.g. the settings a stage ran with, next to its outputs)."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        json.dump(obj, fh, indent=2, default=str)


# ---- settings-checked resume -----------------------------------------------------------------------
def file_hash(path):
    """sha256 of a file's bytes (the content of an input, for a settings-checked resume)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):  # 1 MiB at a time: CSVs of any size
            digest.update(block)
    return digest.hexdigest()

def settings_diff(old, new):
    """'key: old then, new now; ...' for every key whose value differs ('' if none does)."""
    return "; ".join(f"{k}: {old.get(k)!r} then, {new.get(k)!r} now" for k in sorted(set(old) | set(new))
                     if old.get(k) != new.get(k))

def check_resume(path, record, dist=None, kept=True):
    """Settings-checked resume. `record` (the inputs' content hashes and every setting that changes
    the results) describes the work kept next to `path`: the first run writes it there (rank 0), a
    rerun with the same record continues that work, and a rerun with another one stops, naming each
    setting that differs, before it deletes or reuses anything. kept=False: no work made under the
    old record is on disk (a first run stopped by a bad setting before its first result), so there
    is nothing to protect and the corrected command's record replaces it."""
    record = json.loads(json.dumps(record, default=str))  # as it reads back (tuples -> lists, ...)
    if os.path.exists(path):  # a rerun: its settings must be the first run's
        with open(path, encoding="utf-8") as fh:
            old = json.load(fh)
        if (differ := settings_diff(old, record)) and not kept:
            if dist is None or dist.master:
                save_json(path, record)
        elif differ:
            raise UserError(f"{path}: the work here was made with other settings ({differ}); "
                             f"rerun with the same settings to resume, or pass another output folder "
                             f"(or delete this one) to start again")
    elif dist is None or dist.master:  # the first run records what its work is made of
        save_json(path, record)
