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
