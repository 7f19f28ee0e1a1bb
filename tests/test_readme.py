"""README is the user's map: its commands are the ones CI runs, its table names real functions."""
import os
import re

import ast

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()


def top_level_names(path):
    """Functions, classes and assigned names at the top level of a Python file."""
    tree = ast.parse(open(path, encoding="utf-8").read())
    names = {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    return names | {t.id for n in tree.body if isinstance(n, (ast.Assign, ast.AnnAssign))
                    for t in (n.targets if isinstance(n, ast.Assign) else [n.target]) if isinstance(t, ast.Name)}


def test_ci_runs_the_readme_setup_commands_verbatim():
    block = re.search(r"## Set up and test\s+```bash\n(.*?)```", README, re.S).group(1)
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


def test_the_readme_builds_a_tiny_model_from_the_command_line(tmp_path):
    """README's CPU-sized examples start with `python tests/tiny_<stage>.py DIR`, run from the repo."""
    import subprocess
    import sys
    assert "python tests/tiny_generate.py /tmp/tiny-cogvideox" in README
    out = subprocess.run([sys.executable, "tests/tiny_generate.py", str(tmp_path / "cog")], cwd=ROOT,
                         capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert (tmp_path / "cog" / "model_index.json").exists()
