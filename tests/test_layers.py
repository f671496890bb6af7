"""The two layers: the lesson (model/) imports nothing from the harness (harness/) or the scripts, the
harness imports no script, and no module imports itself through a circle."""
import ast
import glob
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ("train", "lora_finetune", "controlnet_train", "quantize", "denoise", "evaluate", "bench", "ablate")


def project_imports(path, package):
    """The project modules that the file at `path` imports, as dotted names ('model.lora', 'harness.cli', 'train')."""
    found = set()
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # from .x import y, inside `package`
                base = f"{package}.{base}" if base else package
            names = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        found |= {n for n in names if n.split(".")[0] in ("model", "harness", *SCRIPTS)}
    return {n for n in found if n in MODULES}


MODULES = {f"{pkg}.{os.path.basename(p)[:-3]}" for pkg in ("model", "harness")
           for p in glob.glob(os.path.join(ROOT, pkg, "*.py")) if not p.endswith("__init__.py")} | set(SCRIPTS)


def graph():
    edges = {}
    for name in MODULES:
        package, _, leaf = name.rpartition(".")
        path = os.path.join(ROOT, *name.split(".")) + ".py"
        edges[name] = project_imports(path, package)
    return edges


def test_the_lesson_imports_nothing_from_the_harness_or_the_scripts():
    edges = graph()
    assert len([m for m in MODULES if m.startswith("model.")]) >= 10
    for module, imported in edges.items():
        if module.startswith("model."):
            assert all(i.startswith("model.") for i in imported), (module, imported)
        if module.startswith("harness."):
            assert not imported & set(SCRIPTS), (module, imported)


def test_no_module_imports_itself_through_a_circle():
    edges = graph()

    def reaches(start, target, seen):
        for nxt in edges.get(start, ()):
            if nxt == target or (nxt not in seen and not seen.add(nxt) and reaches(nxt, target, seen)):
                return True
        return False

    circles = [m for m in edges if reaches(m, m, set())]
    assert not circles, circles


def test_the_checker_sees_a_forbidden_import(tmp_path):
    """The two tests above would pass on a parser that found nothing: show it finds both kinds of import."""
    f = tmp_path / "x.py"
    f.write_text("from harness.cli import Parser\nfrom .lora import LoraLayer\nimport train\n")
    assert project_imports(str(f), "model") == {"harness.cli", "model.lora", "train"}
