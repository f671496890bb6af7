"""The documented commands are real: every `python <script>.py ...` that the README or a script's own
docstring shows parses with that script's flags."""
import importlib
import os
import re
import shlex

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ("train", "lora_finetune", "lora_extract", "controlnet_train", "quantize", "denoise", "evaluate", "bench", "ablate")


def documented_commands():
    """Command lines from the README's bash blocks and inline code, and from the scripts' docstrings."""
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    lines = [line for block in re.findall(r"```bash\n(.*?)```", readme, re.S) for line in block.splitlines()]
    lines += re.findall(r"`(python \S+\.py[^`]*)`", readme)
    for name in SCRIPTS:
        lines += [line.strip() for line in importlib.import_module(name).__doc__.splitlines()]
    commands = [shlex.split(line, comments=True) for line in lines if line.startswith("python ")]
    return [c for c in commands if c[1].endswith(".py")]


def test_every_documented_command_parses():
    commands = documented_commands()
    assert len(commands) >= 25 and {c[1] for c in commands} == {f"{name}.py" for name in SCRIPTS}
    for command in commands:
        script = importlib.import_module(command[1][:-3])
        script.parse_args(command[2:])  # a flag that no longer exists exits with "error: ..." and fails here


def test_the_readmes_quality_numbers_are_the_generated_results():
    """The README's results table quotes docs/results.md (python evaluate.py --results): a number there that
    the results file does not hold was typed by hand, and goes stale."""
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    results = open(os.path.join(ROOT, "docs", "results.md"), encoding="utf-8").read()
    section = readme.split("## Results")[1].split("\n## ")[0]
    rows = [line for line in section.splitlines() if line.startswith("| ") and "---" not in line]
    numbers = {n for row in rows[1:] for n in re.findall(r"\d+\.\d+%?|\d+%", row)}
    assert len(rows) >= 8 and len(numbers) >= 20
    missing = sorted(n for n in numbers if n not in results)
    assert not missing, f"in the README but not in docs/results.md: {missing}"


def test_the_readme_is_a_course_not_a_lab_notebook():
    """No commit hashes (a number the current code does not produce is re-measured or removed, not dated by a
    commit), and the course stays short enough to read in one sitting: about 2,400 words."""
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    assert not re.findall(r"\b[0-9a-f]{7,40}\b", readme), "a commit hash in the README"
    assert len(readme.split()) <= 2400
    for chapter in ("## 1. Diffusion", "## 4. LoRA", "## 5. Is a style low-rank", "## Results", "## Things to try"):
        assert chapter in readme
