"""README.md stays true to the tree: the line counts it states, the files and commands it names."""
import re

from helpers import ROOT

README = (ROOT / "README.md").read_text(encoding="utf-8")
ELSEWHERE = {"fla/ops/kda/naive.py", "modeling_kimi.py"}      # other repositories' files


def test_stated_line_counts_are_the_files():
    stated = re.findall(r"`([\w/]+\.py)`, ([\d,]+) lines", README)
    assert stated, "the pitch states the core files' sizes"
    for name, lines in stated:
        actual = len((ROOT / name).read_text(encoding="utf-8").splitlines())
        assert int(lines.replace(",", "")) == actual, f"README says {name} has {lines} lines"


def test_named_files_exist():
    named = set(re.findall(r"`((?:[\w.]+/)*[\w]+\.(?:py|md|ipynb|json|png))`", README))
    named |= {f"{d}/{f}" for d, f in re.findall(r"\((docs|notebooks)/([\w.]+)\)", README)}
    missing = [n for n in sorted(named - ELSEWHERE) if not (ROOT / n).exists()
               and not (ROOT / "tests" / n).exists() and not (ROOT / "tools" / n).exists()]
    assert not missing, f"README names files the tree does not have: {missing}"


def test_commands_name_existing_programs():
    modules = set(re.findall(r"python -m (tools\.[a-z0-9_]+)", README))
    scripts = set(re.findall(r"python ([\w/]+\.py)", README))
    assert "tools.bench" in modules and "sample.py" in scripts
    missing = [m for m in modules if not (ROOT / (m.replace(".", "/") + ".py")).exists()]
    missing += [s for s in scripts if not (ROOT / s).exists()]
    assert not missing, f"README runs programs the tree does not have: {missing}"
