"""What every stage does with a user's mistake on its command line: a choice flag refused before any
work, a model that is not there named in seconds, and `error: ...` with exit status 2, no traceback."""
import os
import subprocess
import sys

import pytest

import common
import tiny
from tiny import ROOT, assert_user_error, run_cli, run_main
from synvita import disk, video_llm

STAGES = ("01_generate.py", "02_weight.py", "03_train.py", "04_eval.py")


@pytest.mark.parametrize("script", STAGES)
def test_help_lists_each_choice_and_no_empty_default(script):
    done = run_cli(script, "--help")  # as a program: its `if __name__ == "__main__"` reaches run_stage
    assert done.returncode == 0, done.stderr[-2000:]
    assert "(default: )" not in done.stdout and "(default: [])" not in done.stdout
    choices = {"01_generate.py": "{auto,bfloat16,float16,float32}", "02_weight.py": "{first_token,t2v_metrics}",
               "03_train.py": "{llava_v1,card}", "04_eval.py": "{videocon,stable}"}[script]
    assert choices in done.stdout
    # issue 36: a lost node ends a run after --dist_timeout seconds: the help names the flag and what it bounds
    assert "--dist_timeout" in done.stdout and "torch.distributed's timeout" in " ".join(done.stdout.split())
    # the docstring line by line, its launch lines' `\` continuations too (issue 32: they were joined)
    source = open(os.path.join(ROOT, script), encoding="utf-8").read()
    doc = source.split('"""')[1]  # as written in the file
    shown = {line.strip() for line in done.stdout.splitlines()}
    assert all(line.strip() in shown for line in doc.splitlines()), doc


@pytest.mark.parametrize("script, flag, value", [
    ("01_generate.py", "--dtype", "bf16"), ("02_weight.py", "--vqascore", "firsttoken"),
    ("02_weight.py", "--weighting", "Difference"), ("03_train.py", "--prompt", "Card"),
    ("03_train.py", "--answer_loss", "twoway"), ("04_eval.py", "--ties", "Stable"),
    ("04_eval.py", "--sampling", "mid")])
def test_a_bad_choice_is_refused_before_any_work(script, flag, value, tmp_path):
    out = tmp_path / "out"
    argv = [flag, value, "--out_dir" if script != "02_weight.py" else "--out_csv", out]
    done = run_main(script, *argv, cwd=tmp_path)
    assert done.returncode == 2 and f"argument {flag}: invalid choice: '{value}'" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
    assert not out.exists() and os.listdir(tmp_path) == []  # nothing written, not even settings


def test_a_folder_given_relatively_is_not_taken_for_a_hub_id(tmp_path, monkeypatch):
    import huggingface_hub
    import huggingface_hub.constants
    (tmp_path / "runs").mkdir()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)  # a network to reach for...
    monkeypatch.setattr(huggingface_hub, "model_info", lambda *a, **k: pytest.fail("the hub was asked"))  # ...unasked
    done = run_main("04_eval.py", "--model", "runs/tiny-video-lava", "--videocon_llm", "x.csv", cwd=tmp_path)
    assert_user_error(done, "--model runs/tiny-video-lava: no such folder")


def resolve_in_a_fresh_process(name, tmp_path, **env):
    """video_llm.resolve_model(name) in a new interpreter (huggingface_hub reads HF_HUB_OFFLINE, HF_HOME
    and HF_ENDPOINT when imported): what it returns, or its error's message."""
    script = ("import common\nfrom synvita import video_llm\ntry:\n    print(video_llm.resolve_model(%r))\nexcept common.UserError as e:\n"
              "    print('UserError', e)\n" % name)
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), **env}
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=60)  # transformers' own retries would take ~150 s
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.strip()


def test_a_hub_id_with_no_network_is_refused_with_what_to_do(tmp_path):
    offline = resolve_in_a_fresh_process("org/not-downloaded", tmp_path, HF_HUB_OFFLINE="1")
    assert offline.startswith("UserError --model org/not-downloaded: not a folder here, not in the Hugging Face "
                              "cache, and HF_HUB_OFFLINE=1 is set: download it")
    assert "`hf download org/not-downloaded`" in offline
    # a hub that cannot be reached (a closed local port stands for it): one try, then the same advice
    unreachable = resolve_in_a_fresh_process("org/not-downloaded", tmp_path, HF_HUB_OFFLINE="0",
                                             HF_ENDPOINT="http://127.0.0.1:9")
    assert "the hub cannot be reached" in unreachable and "`hf download org/not-downloaded`" in unreachable


def test_a_cached_hub_id_loads_from_its_folder_with_no_network(tmp_path):
    snapshot = tmp_path / "hf" / "hub" / "models--org--cached" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("abc123")
    for env in ({"HF_HUB_OFFLINE": "1"}, {"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9"}):
        assert resolve_in_a_fresh_process("org/cached", tmp_path, **env) == str(snapshot)


def test_an_existing_folder_is_loaded_as_it_is(tmp_path):
    assert video_llm.resolve_model(str(tmp_path)) == str(tmp_path)
    with pytest.raises(common.UserError, match=r"--pipeline \./nowhere: no such folder"):
        video_llm.resolve_model("./nowhere", "--pipeline")


def test_a_full_disk_names_the_file_it_could_not_write(tmp_path, monkeypatch):
    import errno
    import json

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(json, "dump", full)
    with pytest.raises(common.UserError, match=rf"{tmp_path}/out/args.json: cannot write it: No space left on device"):
        disk.save_json(str(tmp_path / "out" / "args.json"), {"a": 1})
    assert os.listdir(tmp_path / "out") == []  # no temporary file left behind


def test_torch_save_on_a_full_disk_names_the_file(tmp_path, monkeypatch):
    import torch

    def full(obj, path):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")
    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(common.UserError, match=r"state.pt: cannot write it \(is the disk full\?\)"):
        with disk.atomic_path(str(tmp_path / "state.pt")) as tmp:
            torch.save({}, tmp)


def test_a_bug_keeps_its_traceback(tmp_path):
    # run_stage turns only UserError into one line: any other exception is a bug and shows where
    script = ("import dataclasses\nfrom synvita import runs\n@dataclasses.dataclass\nclass Args:\n    x: int = 1\n"
              "def main(args):\n    raise KeyError('bug')\nruns.run_stage(main, Args)\n")
    path = tmp_path / "stage.py"
    path.write_text(script)
    done = subprocess.run([sys.executable, str(path)], cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT},
                          capture_output=True, text=True)
    assert done.returncode == 1 and "Traceback" in done.stderr and "KeyError: 'bug'" in done.stderr
    assert tiny.ROOT == ROOT


def numeric_flags(script):
    """(flag, value type, must it be above 0) of every int and float flag of a stage's Args."""
    import dataclasses
    import importlib
    stage = importlib.import_module(os.path.splitext(script)[0])
    return [(f.name, type(f.default), f.name in stage.Args.POSITIVE) for f in dataclasses.fields(stage.Args)
            if type(f.default) in (int, float)]


@pytest.mark.parametrize("script", STAGES)
def test_every_numeric_flag_is_checked_before_any_work(script, tmp_path):
    """Issue 37: a negative, zero (where a count or a rate must be above 0), nan or inf value of any
    numeric flag is one line naming it, before anything is read, looked up or written; a stage's
    POSITIVE names only its own flags."""
    flags = numeric_flags(script)
    assert len(flags) >= 4 and {name for name, _, positive in flags if positive} >= {"dist_timeout"}
    for name, kind, positive in flags:
        bad = ["-1"] + (["0"] if positive else []) + (["nan", "inf", "-inf"] if kind is float else [])
        for value in bad:
            done = run_main(script, f"--{name}={value}", cwd=tmp_path)  # "=": argparse reads -inf as a flag
            wanted = "give a finite number" if value in ("nan", "inf", "-inf") else \
                "give a number >= 0" if not positive else "give a number >= 1" if kind is int else "give a number > 0"
            assert_user_error(done, f"--{name} {float(value) if kind is float else int(value)}: {wanted}")
    assert os.listdir(tmp_path) == []  # nothing written, not even settings


@pytest.mark.parametrize("script, argv", [
    ("01_generate.py", ["--input_csv", "in.csv", "--out_dir", "a_file/gen"]),
    ("02_weight.py", ["--generated_csv", "in.csv", "--out_csv", "a_file/weighted.csv"]),
    ("03_train.py", ["--train_csv", "in.csv", "--out_dir", "a_file"]),
    ("04_eval.py", ["--videocon_llm", "in.csv", "--out_dir", "a_file/eval"])])
def test_an_output_path_through_a_file_is_named_before_any_work(script, argv, tmp_path):
    """Issue 37: an --out_dir (or --out_csv's folder) that is an existing file stops the stage in one
    line naming it, before any input is read (today: FileExistsError / NotADirectoryError mid-run)."""
    (tmp_path / "a_file").write_text("not a folder")
    done = run_main(script, *argv, cwd=tmp_path)
    assert_user_error(done, "a_file is a file, not a folder")
    assert sorted(os.listdir(tmp_path)) == ["a_file"]


def test_a_header_that_names_a_column_twice_stops_before_any_row_is_used(tmp_path):
    """Issue 37 item 1: with `neg_caption` twice a row's dict kept the last cell while the checks
    read the first: an empty t^s was rendered. The shared reader refuses the header, naming both."""
    path = tmp_path / "in.csv"
    path.write_text("videopath,caption,neg_caption,misalignment,split,neg_caption\n"
                    "v.mp4,a cat sits,a cat stands,action,train,\n")
    done = run_main("01_generate.py", "--input_csv", path, "--out_dir", tmp_path / "gen", cwd=tmp_path)
    assert_user_error(done, f"{path}:1: the header names 'neg_caption' more than once (columns 3, 6)")
    assert sorted(os.listdir(tmp_path)) == ["in.csv"]
    (tmp_path / "spaced.csv").write_text("a,b, a\n1,2,3\n")  # a name and the same name with a space: twice too
    with pytest.raises(common.UserError, match=r"spaced.csv:1: the header names 'a' more than once \(columns 1, 3\)"):
        disk.read_csv(str(tmp_path / "spaced.csv"))
