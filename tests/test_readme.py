"""README is the user's map: its commands are the ones CI runs, its table names real functions."""
import ast
import json
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()


def top_level_names(path):
    """Functions, classes and assigned names at the top level of a Python file."""
    tree = ast.parse(open(path, encoding="utf-8").read())
    names = {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    return names | {t.id for n in tree.body if isinstance(n, (ast.Assign, ast.AnnAssign))
                    for t in (n.targets if isinstance(n, ast.Assign) else [n.target]) if isinstance(t, ast.Name)}


def test_readme_cluster_line_is_the_one_the_two_node_tests_run():
    """The command of README's "On a cluster" is torchrun with test_cluster.NODE_FLAGS, which two-node tests launch."""
    from test_cluster import NODE_FLAGS
    block = re.search(r"## On a cluster.*?```bash\n(.*?)```", README, re.S).group(1).split()
    assert block == ["torchrun", *(flag.format(port=29500) for flag in NODE_FLAGS), "04_eval.py", "<flags>"], block


def test_ci_runs_the_readme_setup_commands_verbatim():
    block = re.search(r"```bash\n(.*?)```", README, re.S).group(1)  # README's first block: install, test
    commands = [line for line in block.splitlines() if line.strip()]
    ci = [line.strip() for line in open(os.path.join(ROOT, ".ci", "run"), encoding="utf-8")]
    assert len(commands) == 2 and all(c in ci for c in commands), (commands, ci)


def test_the_paper_table_names_functions_that_exist():
    table = README.split("## Where each part of the paper lives")[1].split("\n## ")[0]
    rows = [r for r in table.splitlines() if r.startswith("| ") and "---" not in r][1:]
    assert len(rows) >= 9
    for row in rows:
        _, _, file, names, _ = row.split("|")
        path = os.path.join(ROOT, file.strip())
        assert os.path.exists(path), row
        defined = top_level_names(path)
        for name in re.findall(r"`(\w+)(?=[`\[(])", names):
            assert name in defined, f"README names {file.strip()}:{name}, which does not exist"


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """README's CPU-sized chain, line by line as printed, from a folder that holds the repository's
    files (so that its runs/ is the test's): each stage exits 0 and feeds the next. tiny_chain.py runs
    as a program (it finds tests/tiny.py from its own folder); each stage line through the stage's own
    entry point in this process (tiny.run_main: its argv, its cwd; test_cli runs each stage as a program).
    -> (the folder, the commands)."""
    import shlex
    import subprocess
    import sys
    import tiny
    tmp_path = tmp_path_factory.mktemp("readme")
    block = re.search(r"## A CPU-sized chain.*?```bash\n(.*?)```", README, re.S).group(1)
    commands = [line for line in block.splitlines() if line.strip()]
    assert [c.split()[1] for c in commands] == ["tests/tiny_chain.py", "01_generate.py", "02_weight.py",
                                               "03_train.py", "04_eval.py", "03_train.py", "04_eval.py",
                                               "01_generate.py", "01_generate.py"]
    for name in os.listdir(ROOT):  # the repository, without its runs/
        if name not in ("runs", ".git") and not name.startswith(".venv"):
            os.symlink(os.path.join(ROOT, name), tmp_path / name)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the programs run (OMP_NUM_THREADS=1): a sum's rounding follows the threads
    for command in commands:
        argv = shlex.split(command)
        assert argv[0] == "python"
        if argv[1].startswith("tests/"):
            done = subprocess.run([sys.executable, *argv[1:]], cwd=tmp_path, env=env, capture_output=True, text=True)
        else:
            done = tiny.run_main(argv[1], *argv[2:], cwd=tmp_path)
        assert done.returncode == 0, (command, done.stdout[-2000:], done.stderr[-3000:])
    torch.set_num_threads(threads)
    return tmp_path, commands


def test_the_cpu_sized_chain_runs_as_printed(chain):
    tmp_path, _ = chain
    tiny = tmp_path / "runs" / "tiny"
    assert len(open(tiny / "gen" / "generated.csv").readlines()) == 1 + 12  # the 12 rows of split train
    assert (tiny / "gen" / "weighted.csv").exists() and (tiny / "train" / "adapter" / "adapter_config.json").exists()
    for name in ("gen-lavie", "gen-vc2"):  # LaVie's and VideoCrafter2's renders of the first 4 rows
        assert len(open(tiny / name / "generated.csv").readlines()) == 1 + 4 and len(os.listdir(tiny / name / "videos")) == 4
    for name in ("eval", "eval-owl"):  # Video-LLaVA, then mPLUG-Owl
        results = json.load(open(tiny / name / "results.json"))["results"]["videocon_llm"]
        assert results["pairs_scored"] == 8  # the 4 test rows, each with its positive and its negative
    # 02's gallery of the tiny run: every V^r and V^s shown (4 frames each), and drawn by a browser
    page = open(tiny / "gen" / "weighted_gallery.html", encoding="utf-8").read()
    entries = page.count('<div class="entry">')  # up to 3 x 3 a type, of the 12 weighted rows
    assert 0 < entries <= 12 and page.count("data:image/jpeg") == entries * 2 * 4
    assert "missing" not in page.split("</style>")[1]  # no placeholder: every video was read
    import test_gallery
    if test_gallery.CHROMIUM:
        shot, loaded, requested = test_gallery.render(str(tiny / "gen" / "weighted_gallery.html"), str(tmp_path / "g.png"))
        assert loaded == [f"file://{tiny / 'gen' / 'weighted_gallery.html'}"] and not requested
        assert (shot.astype(int).max(axis=2) - shot.min(axis=2) > 120).sum() > 1000  # the squares' colours


# Ctrl-C, as a terminal sends it (SIGINT to the stage's process group: its DataLoader workers and
# threads too), at a point of its main loop: the n-th item of a progress bar (01, 02, 04) or the n-th
# optimizer step (03, at its gradient clipping)
INTERRUPT = r"""
import os, runpy, signal, sys, time
import torch, tqdm.std
where, n, script, *argv = sys.argv[1:]
owner, name = (tqdm.std.tqdm, "__iter__") if where == "bar" else (torch.nn.utils, "clip_grad_norm_")
real, calls = getattr(owner, name), []
def ctrl_c():  # the n-th time: Ctrl-C, then time for the signal to land while the stage works
    calls.append(1)
    if len(calls) == int(n):
        os.killpg(0, signal.SIGINT)
        time.sleep(30)
def bar(self):
    for item in real(self):
        ctrl_c()
        yield item
def step(*a, **k):
    ctrl_c()
    return real(*a, **k)
setattr(owner, name, bar if where == "bar" else step)
sys.argv = [script, *argv]
runpy.run_path(script, run_name="__main__")
"""


def test_ctrl_c_is_one_line_and_the_same_command_goes_on(chain):
    """Issue 37: Ctrl-C in any stage ends in one `stopped:` line, exit status 130, no traceback (from
    the stage, its threads or its DataLoader workers); the command it names then finishes the work,
    with the bytes of the run that was never stopped (README's chain)."""
    import shlex
    import subprocess
    import sys
    import tiny
    tmp_path, commands = chain
    runs = {"01_generate.py": ("bar", 2, ["--out_dir", "runs/tiny/c1"], "gen/videos", "c1/videos"),
            "02_weight.py": ("bar", 2, ["--out_csv", "runs/tiny/c2/weighted.csv"], "gen/weighted.csv", "c2/weighted.csv"),
            "03_train.py": ("step", 2, ["--out_dir", "runs/tiny/c3", "--num_workers", "2"], "train/adapter", "c3/adapter"),
            "04_eval.py": ("bar", 1, ["--out_dir", "runs/tiny/c4"], "eval/videocon_llm_scores.csv", "c4/videocon_llm_scores.csv")}
    argvs = {}
    for command in commands:  # the first line of each stage, into a folder of its own
        argv = shlex.split(command)[1:]
        if argv[0] in runs and argv[0] not in argvs:
            argvs[argv[0]] = argv + runs[argv[0]][2]  # argparse: the last --out_dir wins
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    started = {s: subprocess.Popen([sys.executable, "-c", INTERRUPT, runs[s][0], str(runs[s][1]), *argvs[s]], cwd=tmp_path,
                                   env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
               for s in runs}  # side by side: four interpreters' start-up at once
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the chain's, OMP_NUM_THREADS=1: a sum's rounding follows the threads
    for script, process in started.items():
        out, err = process.communicate(timeout=300)
        last = err.strip().splitlines()[-1]
        assert process.returncode == 130 and "Traceback" not in err, (script, process.returncode, err[-3000:])
        assert last.startswith(f"stopped: {script} was interrupted") and "goes on" in last, last
        again = argvs[script] + (["--resume"] if "--resume" in last else [])  # the command the line names
        done = tiny.run_main(*again, cwd=tmp_path)  # in this process: no interpreter's start-up again
        assert done.returncode == 0, (script, done.stderr[-3000:])
        before, after = (tmp_path / "runs" / "tiny" / p for p in runs[script][3:])
        files = sorted(os.listdir(before)) if before.is_dir() else [""]
        assert files == (sorted(os.listdir(after)) if after.is_dir() else [""])
        for name in files:
            assert (before / name).read_bytes() == (after / name).read_bytes(), (script, name)
    torch.set_num_threads(threads)
