"""Layers import only downward: every import in the package (module-level and function-local, absolute
and relative) goes to the same layer or a lower one. The order is stated in docs/design.md ("Layers")."""

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


def test_every_package_module_has_a_layer():
    missing = sorted({m.split(".")[1] for m in package_modules() if "." in m} - set(LAYER_OF))
    assert not missing, f"assign these modules/packages a layer in LAYERS (and docs/design.md): {missing}"


def test_no_import_goes_up_a_layer():
    bad = upward_imports(package_modules())
    assert not bad, "imports from a lower layer to a higher one:\n" + "\n".join(bad)


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
