"""The project's import graph runs one way: model.py and vision.py at the root import no other project file, and no
top-level file reaches itself through the files it imports, imports inside functions included."""
import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FILES = sorted(f[:-3] for f in os.listdir(ROOT) if f.endswith(".py"))


def imports(name, files=FILES, root=ROOT):
    """The project files that file `name` imports, anywhere in it."""
    with open(os.path.join(root, name + ".py")) as f:
        tree = ast.parse(f.read())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module.split(".")[0])
    return found & set(files) - {name}


def cycle(graph):
    """One import circle of graph {file: files it imports} as a list of files, or None."""
    state = {}

    def visit(n, path):
        state[n] = "open"
        for m in sorted(graph[n]):
            if state.get(m) == "open":
                return path[path.index(m):] + [m]
            if m not in state and (found := visit(m, path + [m])):
                return found
        state[n] = "done"

    for n in sorted(graph):
        if n not in state and (found := visit(n, [n])):
            return found


def test_no_import_circle():
    graph = {f: imports(f) for f in FILES}
    assert cycle(graph) is None, " -> ".join(cycle(graph))
    assert imports("vision") == set() and imports("model") == {"vision"}, graph


def test_the_check_finds_a_circle(tmp_path):
    # the check itself: a circle planted through imports inside a function and a __main__ block is found
    (tmp_path / "a.py").write_text("import os\nfrom b import f\n")
    (tmp_path / "b.py").write_text("def f():\n    import c.sub\n")
    (tmp_path / "c.py").write_text("if __name__ == '__main__':\n    from a import x\n")
    (tmp_path / "d.py").write_text("from . import a\n")  # relative: not a top-level file's import
    graph = {n: imports(n, "abcd", tmp_path) for n in "abcd"}
    assert graph == {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}
    assert cycle(graph) == ["a", "b", "c", "a"]
    assert cycle({**graph, "c": set()}) is None
