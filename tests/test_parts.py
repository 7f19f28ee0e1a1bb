"""synvita/parts.py, the per-rank part files of 02 and 04: whole records only, a torn one cut before the
file grows, markers that carry a payload."""
import json

from synvita import parts
from synvita.runs import Dist

RECORDS = [["v1.mp4", "a caption, with é", "0.5", "0.0"], {"key": "k", "target": [0.25]}, ["v2.mp4", "line\r\nend", "1", "2"]]


def write(path, records):
    path.write_bytes("".join(json.dumps(r) + "\n" for r in records).encode("utf-8"))


def test_a_cut_at_every_byte_keeps_the_whole_records_and_the_next_append_starts_clean(tmp_path):
    path = tmp_path / "part.rank0.jsonl"
    write(path, RECORDS)
    data = path.read_bytes()
    last = data.rindex(b"\n", 0, len(data) - 1) + 1  # where the last record starts
    for cut in range(last, len(data)):  # every byte of the last record, its newline excluded
        path.write_bytes(data[:cut])
        assert parts.read_records(str(path)) == (RECORDS[:2], last)
        with parts.appending(str(path)) as fh:
            fh.write(json.dumps(RECORDS[2]) + "\n")
        assert parts.read_records(str(path)) == (RECORDS, len(data))  # the torn bytes are gone


def test_valid_ends_the_file_at_a_record_it_refuses_and_appending_cuts_there(tmp_path):
    path = tmp_path / "sub" / "part.jsonl"
    with parts.appending(str(path)) as fh:  # created, with its folder
        fh.write("".join(json.dumps(r) + "\n" for r in RECORDS))
    def lists(record):  # the records a caller takes: lists, as 04's scores
        return isinstance(record, list)
    records, end = parts.read_records(str(path), lists)
    assert records == RECORDS[:1] and end == len(json.dumps(RECORDS[0]).encode()) + 1
    with parts.appending(str(path), lists) as fh:
        fh.write(json.dumps(RECORDS[2]) + "\n")
    assert parts.read_records(str(path), lists)[0] == [RECORDS[0], RECORDS[2]]


def test_markers_carry_their_payload_and_an_earlier_runs_are_cleared(tmp_path):
    markers = [str(tmp_path / f"finished.rank{r}.json") for r in range(2)]
    parts.finish(markers[1], [["bad.mp4", "cannot decode"]])
    parts.finish(markers[0])
    assert parts.wait_for_all(markers) == [None, [["bad.mp4", "cannot decode"]]]
    parts.clear_finished(str(tmp_path / "finished.rank*.json"), Dist())
    assert not list(tmp_path.iterdir())
