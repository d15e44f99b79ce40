"""The project's imports go one way (README, "Files, in reading order"):

    kda_ref  <-  kernels (kda_triton, fast/'s kernel files)  <-  the model (kimi, checkpoint,
    tokenizer)  <-  transforms (fast.decode, fast.quantize)  <-  sample, demo  <-  tools/

Read from the source with ast, every import counted, the ones inside functions too."""
import ast

from helpers import ROOT

KERNELS = {"kda_triton", "kda_backward", "fast.short_conv", "fast.moe", "fast.kda_decode",
           "fast.mla_decode", "fast.moe_decode", "fast.fp8", "fast.pointwise"}
TRANSFORMS = {"fast.decode", "fast.quantize"}
TOOL_TESTS = {"tests.test_tools"}       # a tool's own tests import it; nothing else does


def module_name(path):
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def our_modules():
    files = [*ROOT.glob("*.py"), *ROOT.glob("fast/*.py"), *ROOT.glob("tools/*.py"),
             *ROOT.glob("tests/*.py"), *ROOT.glob("notebooks/*.py")]
    return {module_name(f): f for f in files}


def imports_of(path, modules):
    """The modules of ours that `path` imports (`from fast import moe` imports fast.moe)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        for name in names:
            if name.startswith("tests."):
                continue
            bare = "tests." + name            # tests import each other by bare name
            if path.parent.name == "tests" and bare in modules:
                found.add(bare)
            elif name in modules:
                found.add(name)
    return found


GRAPH = {name: imports_of(path, our_modules()) for name, path in our_modules().items()}


def reach(start):
    """Every module start imports, directly or through others."""
    seen, todo = set(), [start]
    while todo:
        for m in GRAPH.get(todo.pop(), ()):
            if m not in seen:
                seen.add(m)
                todo.append(m)
    return seen


def test_the_graph_sees_the_project():
    assert {"kimi", "kda_ref", "kda_triton", "sample", "fast.decode", "tools.bench"} <= set(GRAPH)
    assert "fast.moe" in GRAPH["kimi"] and "kimi" in GRAPH["fast.decode"]    # it reads imports


def test_no_import_cycles():
    cycles = sorted(m for m in GRAPH if m in reach(m))
    assert not cycles, f"modules that import themselves through others: {cycles}"


def test_kda_ref_imports_nothing_of_ours():
    assert GRAPH["kda_ref"] == set()


def test_kernels_never_import_the_model():
    for kernel in KERNELS:
        # the definition, the shared Triton helpers, and other kernel files (kda_triton's autograd
        # calls kda_backward; fast.fp8's experts use fast.moe's), never in a cycle back to itself
        allowed = {"kda_ref", "fast"} | (KERNELS - {kernel})
        assert reach(kernel) <= allowed, f"{kernel} imports {sorted(reach(kernel) - allowed)}"


def test_the_model_never_reaches_its_transforms():
    for model in ("kimi", "checkpoint", "tokenizer"):
        found = reach(model) & (TRANSFORMS | {"sample", "demo"})
        assert not found, f"{model} reaches {sorted(found)}"


def test_nothing_imports_tools():
    for name, imported in GRAPH.items():
        if not name.startswith("tools.") and name not in TOOL_TESTS:
            found = sorted(m for m in imported if m.startswith("tools"))
            assert not found, f"{name} imports {found}"


def test_tests_never_import_tests():
    for name, imported in GRAPH.items():
        found = sorted(m for m in imported if m.startswith("tests.test_"))
        assert not found, f"{name} imports {found}"


def test_no_file_edits_sys_path():
    """Modules import by their names from the root (python -m tools.bench, pytest's rootdir):
    no file reaches around that by editing sys.path."""
    edits = [name for name, path in our_modules().items()
             for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
             if isinstance(node, ast.Attribute) and ast.unparse(node) == "sys.path"]
    assert not edits, edits
