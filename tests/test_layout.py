"""The package's shape: no module imports another that (directly or through others) imports it back."""
from code_shape import import_cycles, import_graph


def test_no_import_cycles():
    cycles = import_cycles(import_graph())
    assert not cycles, "import cycles: " + "; ".join(" <-> ".join(c) for c in cycles)


def test_cycle_finder_sees_a_cycle(tmp_path):
    """The check itself: two modules importing each other (one of them lazily) are a cycle."""
    package = tmp_path / "menet_qgis"
    (package / "core").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "core" / "__init__.py").write_text("")
    (package / "core" / "a.py").write_text("from . import b\n")
    (package / "core" / "b.py").write_text("def f():\n    from .a import g\n")
    assert import_cycles(import_graph(tmp_path)) == [["menet_qgis.core.a", "menet_qgis.core.b"]]


def test_documents_named_in_the_code_exist():
    """Help texts and comments point at docs/ pages instead of restating numbers: those pages must exist."""
    import re
    from code_shape import ROOT, package_modules
    named = {(path, m) for path in package_modules().values()
             for m in re.findall(r"\b((?:docs|resources/models)/[\w./-]+\.md)\b", path.read_text())}
    assert named, "no document named anywhere: the pattern is wrong"
    missing = sorted(f"{path.relative_to(ROOT)}: {m}" for path, m in named if not (ROOT / m).is_file())
    assert not missing, missing
