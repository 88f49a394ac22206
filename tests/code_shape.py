"""The shape of the package, read from its source: import graph, cycles, lines per package, longest functions.

`python tests/code_shape.py` prints the report; tests/test_layout.py asserts on it.  Every import counts, the
ones inside functions too: a lazy import that closes a circle is still a circle a reader has to untangle.
Read with `ast` (no module is imported), so it works without QGIS or torch.
"""
import ast
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "menet_qgis"


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def package_modules(root: Path = ROOT) -> dict:
    """Dotted module name -> path for every .py file of the package."""
    return {module_name(p, root): p for p in sorted((root / PACKAGE).rglob("*.py"))}


def imported_modules(path: Path, name: str, known: set) -> set:
    """The package's own modules that `path` imports (relative imports resolved; `from pkg import mod` → mod)."""
    is_package = path.name == "__init__.py"
    tree = ast.parse(path.read_text(), str(path))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[:len(base) - (node.level - 1)]
                stem = ".".join(base + ([node.module] if node.module else []))
            else:
                stem = node.module or ""
            targets = [f"{stem}.{alias.name}" if f"{stem}.{alias.name}" in known else stem for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:  # `import a.b.c` where only a.b is a module, etc.
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def import_graph(root: Path = ROOT) -> dict:
    modules = package_modules(root)
    known = set(modules)
    return {name: imported_modules(path, name, known) for name, path in modules.items()}


def _parents_of(name: str) -> set:
    parts = name.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts))}


def import_cycles(graph: dict) -> list:
    """Strongly connected components with more than one module (Tarjan).  A package's __init__ importing its
    own submodule is not a circle with the submodule importing a sibling, so edges into a module's own parent
    packages are left out."""
    edges = {m: {t for t in ts if t not in _parents_of(m)} for m, ts in graph.items()}
    index, low, on_stack, stack, result, counter = {}, {}, set(), [], [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                result.append(sorted(component))

    sys.setrecursionlimit(10000)
    for v in sorted(edges):
        if v not in index:
            visit(v)
    return sorted(result)


def lines_per_package(root: Path = ROOT) -> dict:
    counts = defaultdict(int)
    for name, path in package_modules(root).items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        counts[package] += len(path.read_text().splitlines())
    return dict(sorted(counts.items()))


def function_lengths(root: Path = ROOT) -> list:
    """(lines, qualified name) for every function and method, longest first."""
    result = []
    for name, path in package_modules(root).items():
        tree = ast.parse(path.read_text(), str(path))

        def walk(node, prefix):
            for child in ast.iter_child_nodes(node):
                if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    qual = f"{prefix}.{child.name}"
                    result.append((child.end_lineno - child.lineno + 1, qual))
                    walk(child, qual)
                elif isinstance(child, ast.ClassDef):
                    walk(child, f"{prefix}.{child.name}")
        walk(tree, name)
    return sorted(result, reverse=True)


def main(argv=None) -> int:
    root = Path(argv[0]).resolve() if argv else ROOT
    graph = import_graph(root)
    print("lines per package:")
    total = 0
    for package, count in lines_per_package(root).items():
        total += count
        print(f"  {package:32s} {count:6d}")
    print(f"  {'total':32s} {total:6d}")
    cycles = import_cycles(graph)
    print(f"import cycles: {len(cycles)}")
    for cycle in cycles:
        print("  " + " <-> ".join(cycle))
    print("longest functions:")
    for length, qual in function_lengths(root)[:12]:
        print(f"  {length:4d}  {qual}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
