"""README is the user's map: its commands are the ones CI runs, its table names real functions."""
import os
import re

import common

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()


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
        assert os.path.exists(os.path.join(ROOT, file.strip())), row
        if file.strip() == "common.py":
            for name in re.findall(r"`(\w+)(?=[`\[(])", names):
                assert hasattr(common, name), f"README names common.{name}, which does not exist"
