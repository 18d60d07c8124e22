"""Imports run one way: no module of the package imports itself back through others (read from the source's AST,
function-level imports included: a deferred import is still a dependency)."""

import ast
from pathlib import Path


PACKAGE = Path(__file__).resolve().parent.parent / "llama3"
# The loading pipe: formats below, quantization above them, model building and llama3.load above both, export
# beside the formats.
LOADING = {"llama3.weights", "llama3.weights.meta", "llama3.weights.hf", "llama3.weights.gguf",
           "llama3.weights.quantized", "llama3.quantize", "llama3.llama", "llama3.export", "llama3.hub",
           "llama3.model", "llama3.args", "llama3.tokenizer"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """module -> the package's modules it imports: `from X import name` counts X.name when that is a module, else X.
    The parent packages Python runs implicitly are not counted (every module would then depend on llama3/__init__)."""
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                for alias in node.names:  # a submodule, or else a name defined in the module `base`
                    targets.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in files else base)
        graph[name] = {t for t in targets if t in files and t != name}
    return graph


def import_circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, circles = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
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
                circles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(circles)


def test_the_checker_finds_a_circle():
    assert import_circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert import_circles({"a": {"b"}, "b": set()}) == []


def test_loading_is_a_one_way_pipe():
    graph = import_graph()
    assert not [c for c in import_circles(graph) if LOADING & set(c)]
    formats = {m for m in graph if m.startswith("llama3.weights")}
    for m in formats:  # formats know nothing of quantization, model building or export
        assert not graph[m] & {"llama3.quantize", "llama3.llama", "llama3.export"}, m


def test_package_has_no_import_circles():
    assert import_circles(import_graph()) == []
