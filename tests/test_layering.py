"""The layering the design promises: the kernel package never reaches up into the search,
and the command line's help never imports torch."""
import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_no_module_of_qra_kernels_imports_qra_search():
    offenders = []
    for path in sorted((ROOT / "qra_kernels").rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            if any(n == "qra_search" or n.startswith("qra_search.") for n in names):
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not offenders, f"qra_kernels imports qra_search at {offenders}"
