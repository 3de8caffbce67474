"""Imports point one way: ops (+ reference, kernels) -> data -> config -> model -> engine ->
entry points (docs/architecture.md, "Layout and import direction").

Every module's source is parsed (nothing is imported), each ``r3v_fast`` import it makes —
at module level or inside a function — is mapped to its layer, and an import of a higher layer
fails the test with the module, the line and the import.
"""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

LAYERS = {"ops": 0, "reference": 0, "kernels": 0, "_C": 0, "data": 1, "config": 2, "model": 3,
          "engine": 4}
TOP = 5   # train, evaluate, pretrain, scoring, integrations, the package itself


def layer(module: str) -> int:
    parts = module.split(".")
    if parts[0] != "r3v_fast":
        raise ValueError(module)
    return LAYERS.get(parts[1], TOP) if len(parts) > 1 else TOP


def modules():
    for path in sorted((ROOT / "r3v_fast").rglob("*.py")):
        rel = path.relative_to(ROOT).with_suffix("")
        yield ".".join(rel.parts).removesuffix(".__init__"), path, path.name == "__init__.py"
    for path in sorted((ROOT / "kernels").glob("*.py")):
        name = "r3v_fast.kernels" + ("" if path.stem == "__init__" else f".{path.stem}")
        yield name, path, path.name == "__init__.py"


def imports(name: str, path: Path, is_package: bool):
    package = name if is_package else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            targets = [module] if node.module or not node.level else [f"{module}.{a.name}" for a in node.names]
            if module == "r3v_fast":   # `from r3v_fast import train`
                targets = [f"r3v_fast.{a.name}" for a in node.names]
        else:
            continue
        for target in targets:
            if target == "r3v_fast" or target.startswith("r3v_fast."):
                yield node.lineno, target


def test_imports_point_one_way():
    seen, wrong = 0, []
    for name, path, is_package in modules():
        seen += 1
        for lineno, target in imports(name, path, is_package):
            if layer(target) > layer(name):
                wrong.append(f"{path.relative_to(ROOT)}:{lineno}: {name} imports {target}")
    assert seen > 30
    assert not wrong, "imports against the layer order:\n" + "\n".join(wrong)


def test_the_checker_sees_a_wrong_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from r3v_fast.engine.loop import Run\n")
    found = list(imports("r3v_fast.model.bad", bad, False))
    assert found == [(2, "r3v_fast.engine.loop")] and layer(found[0][1]) > layer("r3v_fast.model.bad")
    rel = tmp_path / "rel.py"
    rel.write_text("from ..engine import loop\n")
    assert [layer(t) for _, t in imports("r3v_fast.data.rel", rel, False)] == [LAYERS["engine"]]
