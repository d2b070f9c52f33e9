"""Layers import only downward: every import in the package (module-level and function-local, absolute
and relative) goes to the same layer or a lower one, and no modules import each other in a circle (within a
layer, where the layering allows it). The order is stated in docs/design.md ("Layers")."""

import ast
import os

from tests.helpers.paths import REPO_ROOT

PACKAGE = "megatron_tokenformer"

#: lowest first; a module may import its own layer and the layers before it
LAYERS = [
    {"errors", "cli", "config", "ops", "fileio"},
    {"launch", "parallel_state", "deepspeed_boundary"},
    {"tensor_parallel"},
    {"model"},
    {"data"},
    {"checkpointing"},
    {"training", "arguments", "checkpoint_args"},
    {"evaluation", "testing", "__init__"},
    {"interop"},
]
LAYER_OF = {name: i for i, names in enumerate(LAYERS) for name in names}
DOC_LINE = "errors, cli, config, ops, fileio < launch, parallel_state, deepspeed_boundary < tensor_parallel < " \
           "model < data < checkpointing < training, arguments, checkpoint_args < evaluation, testing < interop"


def package_modules():
    """{dotted module name: path} of every .py file of the package."""
    root = os.path.join(REPO_ROOT, PACKAGE)
    out = {}
    for folder, _, files in os.walk(root):
        for name in files:
            if name.endswith(".py"):
                rel = os.path.relpath(os.path.join(folder, name), REPO_ROOT)[:-3].replace(os.sep, ".")
                out[rel[:-len(".__init__")] if rel.endswith(".__init__") else rel] = os.path.join(folder, name)
    return out


def imported_modules(source: str, module: str, is_package: bool):
    """Dotted names of the package modules ``source`` imports anywhere (function bodies included), with
    their line numbers: ``[(line, name)]``."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            # ``from megatron_tokenformer import parallel_state``, ``from . import blending``: the names are modules
            if target == PACKAGE or not node.module:
                found += [(node.lineno, f"{target}.{alias.name}") for alias in node.names]
            else:
                found.append((node.lineno, target))
    return [(line, name) for line, name in found if name == PACKAGE or name.startswith(PACKAGE + ".")]


def layer(module: str) -> int:
    """The layer of a package module. ``import megatron_tokenformer`` itself (``__version__``) is at the
    bottom: the package ``__init__`` imports nothing until one of its lazy names is read, and a name
    read from it (``from megatron_tokenformer import TokenformerLM``) counts as the top layer."""
    parts = module.split(".")
    if len(parts) == 1:
        return 0
    return LAYER_OF.get(parts[1], LAYER_OF["__init__"])


def upward_imports(modules):
    bad = []
    for module, path in sorted(modules.items()):
        with open(path) as f:
            source = f.read()
        here = LAYER_OF["__init__"] if module == PACKAGE else layer(module)
        for line, target in imported_modules(source, module, path.endswith("__init__.py")):
            if layer(target) > here:
                bad.append(f"{os.path.relpath(path, REPO_ROOT)}:{line} imports {target} (layer {layer(target)} > "
                           f"{here})")
    return bad


def import_graph(modules):
    """{module: {(line, imported module)}}: the package modules each module imports anywhere (function
    bodies included; not the type-only imports under ``if TYPE_CHECKING:``, which never run).
    ``from megatron_tokenformer.data import tokenizer`` is an edge to the module ``data.tokenizer``;
    ``from megatron_tokenformer.model import TokenformerLM`` one to the package ``model`` (its
    ``__init__``). The parent packages Python imports on the way are not edges."""
    graph = {}
    for module, path in modules.items():
        with open(path) as f:
            source = f.read()
        edges = module_imports(source, module, path.endswith("__init__.py"), modules)
        graph[module] = {(line, target) for line, target in edges if target in modules and target != module}
    return graph


def module_imports(source: str, module: str, is_package: bool, modules):
    """``[(line, module)]`` of the package modules ``source`` imports: ``from pkg import name`` is
    ``pkg.name`` where that is a module, else ``pkg``; imports under ``if TYPE_CHECKING:`` are left out."""
    tree = ast.parse(source)
    type_only = {id(node) for branch in ast.walk(tree) if isinstance(branch, ast.If) and _is_type_checking(branch.test)
                 for stmt in branch.body for node in ast.walk(stmt)}
    found = []
    for node in ast.walk(tree):
        if id(node) in type_only:
            continue
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if is_package else module.split(".")[:-1]
                target = ".".join(base[:len(base) - (node.level - 1)] + ([node.module] if node.module else []))
            else:
                target = node.module
            for alias in node.names:
                submodule = f"{target}.{alias.name}"
                found.append((node.lineno, submodule if submodule in modules else target))
    return [(line, name) for line, name in found if name in modules]


def _is_type_checking(test) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def import_cycles(graph):
    """The circles of ``graph`` (as :func:`import_graph` returns): one list of modules per strongly
    connected component of more than one module, each ordered along a circle through it
    (``[a, b, c]`` means a imports b imports c imports a)."""
    succ = {m: sorted({t for _, t in edges}) for m, edges in graph.items()}
    index, low, stack, on_stack, components = {}, {}, [], set(), []

    def strongconnect(root):  # Tarjan, iterative (no recursion limit on a long chain)
        work = [(root, 0)]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, i = work.pop()
            nexts = succ.get(node, [])
            if i < len(nexts):
                work.append((node, i + 1))
                nxt = nexts[i]
                if nxt not in index:
                    index[nxt] = low[nxt] = len(index)
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, 0))
                elif nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
                continue
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    components.append(set(component))

    for module in sorted(succ):
        if module not in index:
            strongconnect(module)
    return [_circle_through(component, succ) for component in sorted(components, key=min)]


def _circle_through(component, succ):
    """A shortest circle from the component's first module back to itself (breadth-first, inside it)."""
    start = min(component)
    previous = {start: None}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for nxt in succ[node]:
                if nxt == start:
                    path = [node]
                    while previous[path[-1]] is not None:
                        path.append(previous[path[-1]])
                    return path[::-1]
                if nxt in component and nxt not in previous:
                    previous[nxt] = node
                    following.append(nxt)
        frontier = following
    raise AssertionError(f"no circle through {start} in {sorted(component)}")


def describe_cycle(cycle, graph):
    """``a (line 3) -> b (line 9) -> a``: each arrow with the line of the import that makes it."""
    parts = []
    for i, module in enumerate(cycle):
        target = cycle[(i + 1) % len(cycle)]
        lines = sorted(line for line, t in graph[module] if t == target)
        parts.append(f"{module} (line {lines[0]})")
    return " -> ".join(parts + [cycle[0]])


def test_every_package_module_has_a_layer():
    missing = sorted({m.split(".")[1] for m in package_modules() if "." in m} - set(LAYER_OF))
    assert not missing, f"assign these modules/packages a layer in LAYERS (and docs/design.md): {missing}"


def test_no_import_goes_up_a_layer():
    bad = upward_imports(package_modules())
    assert not bad, "imports from a lower layer to a higher one:\n" + "\n".join(bad)


def test_no_modules_import_each_other_in_a_circle():
    graph = import_graph(package_modules())
    cycles = import_cycles(graph)
    assert not cycles, "modules that import each other in a circle (function-local imports count):\n" + \
        "\n".join(describe_cycle(c, graph) for c in cycles)


def test_the_cycle_finder_names_every_circle_and_only_circles():
    # a -> b -> c -> a (c's import is function-local), d -> e -> d, f -> a and g -> a (not in a circle),
    # f -> h only for type checking (never runs: no circle f -> a ... h -> f)
    sources = {
        "a": "from megatron_tokenformer.p import b\n",
        "b": "import os\nfrom . import c\n",
        "c": "def f():\n    from megatron_tokenformer.p.a import x\n",
        "d": "from megatron_tokenformer.p.e import y\n",
        "e": "from megatron_tokenformer.p import d\n",
        "f": "from megatron_tokenformer.p.a import z\nfrom megatron_tokenformer.p import h\n",
        "g": "import megatron_tokenformer.p.a\n",
        "h": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from megatron_tokenformer.p.f import w\n",
    }
    modules = {f"{PACKAGE}.p.{name}": name for name in sources}
    graph = {}
    for module, name in modules.items():
        graph[module] = set(module_imports(sources[name], module, False, modules))
    cycles = import_cycles(graph)
    p = f"{PACKAGE}.p."
    assert cycles == [[p + "a", p + "b", p + "c"], [p + "d", p + "e"]]
    assert describe_cycle(cycles[0], graph) == f"{p}a (line 1) -> {p}b (line 2) -> {p}c (line 2) -> {p}a"


def test_the_walker_sees_function_local_and_relative_imports():
    source = ("from . import blending\n"
              "def f():\n"
              "    from megatron_tokenformer.training import loop\n"
              "    import megatron_tokenformer.model.spec\n"
              "    from megatron_tokenformer import checkpointing\n")
    found = imported_modules(source, f"{PACKAGE}.data.gpt_dataset", is_package=False)
    assert found == [(1, f"{PACKAGE}.data.blending"), (3, f"{PACKAGE}.training"),
                     (4, f"{PACKAGE}.model.spec"), (5, f"{PACKAGE}.checkpointing")]
    assert [layer(name) for _, name in found] == [4, 6, 3, 5]


def test_design_doc_states_this_order():
    with open(os.path.join(REPO_ROOT, "docs", "design.md")) as f:
        assert DOC_LINE in f.read(), f"docs/design.md should state the layer order: {DOC_LINE}"


# --------------------------------------------------------------------------- the argument namespace
#: the modules that parse the flags and build the typed option records from them (the entry point's side);
#: every other module receives records, never the namespace
NAMESPACE_READERS = {f"{PACKAGE}.arguments", f"{PACKAGE}.checkpoint_args", f"{PACKAGE}.cli",
                     f"{PACKAGE}.training.pretrain"}


def namespace_uses(source: str):
    """Line numbers where ``source`` reads or writes a namespace named ``args``: ``args.x``,
    ``getattr(args, ...)``, ``setattr(args, ...)``, ``vars(args)``."""
    lines = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "args":
            lines.append(node.lineno)
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) \
                and node.func.id in ("getattr", "setattr", "vars", "hasattr") and node.args \
                and isinstance(node.args[0], ast.Name) and node.args[0].id == "args":
            lines.append(node.lineno)
    return sorted(set(lines))


def test_below_the_entry_point_no_module_takes_the_argument_namespace():
    found = []
    for module, path in sorted(package_modules().items()):
        if module in NAMESPACE_READERS:
            continue
        with open(path, encoding="utf-8") as f:
            found += [f"{module} line {line}" for line in namespace_uses(f.read())]
    assert not found, "reads the argument namespace (take a typed options record instead): " + "; ".join(found)


def test_the_namespace_finder_sees_every_form():
    source = ("def f(args, other):\n"
              "    a = args.save\n"
              "    b = getattr(args, 'load', None)\n"
              "    setattr(args, 'x', 1)\n"
              "    d = vars(args)\n"
              "    e = other.args\n"
              "    g = getattr(other, 'args')\n"
              "    return hasattr(args, 'y')\n")
    assert namespace_uses(source) == [2, 3, 4, 5, 8]
