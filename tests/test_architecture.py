"""The package's structure: layers import only downwards; methods, optimizers and model families
are the places new work plugs in; every train flag has help from its one definition."""
import ast
import dataclasses
import os
import subprocess
import sys


import mindscedit

PACKAGE = os.path.dirname(mindscedit.__file__)
# Bottom to top. A module may import its own layer and the ones below, never one above.
LAYERS = [
    {"", "errors", "output_paths", "compat", "runtime", "layers", "losses", "tuners"},
    {"models"},
    {"data"},
    {"training", "sampling"},
    {"bench", "convert"},
    {"cli", "_compile_cache_entry"},
]


def layer_of(top: str) -> int:
    return next(i for i, names in enumerate(LAYERS) if top in names)


def imported_tops(path: str, module_parts):
    """The top-level mindscedit subpackage of every mindscedit import in a file."""
    tree = ast.parse(open(path, encoding="utf-8").read())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the importing module's package
                base = module_parts[: len(module_parts) - node.level]
                target = base + (node.module.split(".") if node.module else [])
                yield target[0] if target else "", node.lineno
            elif node.module and node.module.split(".")[0] == "mindscedit":
                yield (node.module.split(".") + [""])[1], node.lineno
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "mindscedit":
                    yield (parts + [""])[1], node.lineno


def test_no_module_imports_a_layer_above_it():
    upward = []
    for folder, _, files in os.walk(PACKAGE):
        for name in files:
            if not name.endswith(".py"):
                continue
            path = os.path.join(folder, name)
            module_parts = os.path.relpath(path, PACKAGE)[:-3].split(os.sep)  # e.g. ["training", "trainer"]
            own = module_parts[0] if len(module_parts) > 1 or module_parts[0] != "__init__" else ""
            for top, line in imported_tops(path, module_parts):
                if layer_of(top) > layer_of(own):
                    upward.append(f"{os.path.relpath(path, PACKAGE)}:{line} imports {top or 'mindscedit'}")
    assert not upward, "\n".join(upward)


def test_the_layer_check_sees_an_upward_import(tmp_path):
    """The check above would catch models importing training."""
    fake = tmp_path / "loading.py"
    fake.write_text("from ..training.trainer import Trainer\nfrom ..errors import UserError\n")
    tops = [top for top, _ in imported_tops(str(fake), ["models", "loading"])]
    assert tops == ["training", "errors"] and layer_of("training") > layer_of("models")


def names_compared_outside(names, own_files):
    """file:line of every comparison with one of `names` in the package, except in `own_files`."""
    found = []
    for folder, _, files in os.walk(PACKAGE):
        for name in files:
            path = os.path.join(folder, name)
            if not name.endswith(".py") or os.path.relpath(path, PACKAGE) in own_files:
                continue
            for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
                if isinstance(node, ast.Compare) and any(
                    isinstance(c, ast.Constant) and c.value in names for c in [node.left, *node.comparators]
                ):
                    found.append(f"{os.path.relpath(path, PACKAGE)}:{node.lineno}")
    return found


def test_no_method_name_is_tested_outside_the_methods():
    """Method-specific behaviour lives in training/methods.py: nowhere else compares a method name."""
    from mindscedit.training.methods import METHODS

    assert not names_compared_outside(METHODS, {os.path.join("training", "methods.py")})


def test_no_optimizer_name_is_tested_outside_the_optimizers():
    """An optimizer's settings checks and state live with it (training/optimizers.py, prodigy.py)."""
    from mindscedit.training.optimizers import OPTIMIZERS

    own = {os.path.join("training", "optimizers.py"), os.path.join("training", "prodigy.py")}
    assert not names_compared_outside(OPTIMIZERS, own)


def test_every_train_flag_has_a_description_and_its_choices_in_help():
    from mindscedit.training.config import TrainConfig, choices_of

    help_text = subprocess.run([sys.executable, "-m", "mindscedit.cli", "train", "--help"], capture_output=True,
                               text=True, check=True, env=dict(os.environ, COLUMNS="1000")).stdout
    options = help_text[help_text.index("options:"):]
    entries = {}  # flag -> its help entry (argparse may put the description on the next line)
    for block in options.split("\n  --")[1:]:
        entries["--" + block.split()[0]] = " ".join(block.split())
    for f in dataclasses.fields(TrainConfig):
        assert f.metadata["help"], f"{f.name} has no description"
        line = entries[f"--{f.name}"]
        assert f.metadata["help"].split(";")[0][:30] in line, line
        if choices_of(f.name):
            assert "{" + ",".join(map(str, choices_of(f.name))) + "}" in line, line
    assert "None of PyTorch" not in help_text


def test_a_method_declares_its_data_precision_validation_and_saving():
    """What the loop asks of a method, per method: no method is half-declared."""
    from mindscedit.training.config import TrainConfig
    from mindscedit.training.methods import METHODS, Method

    for name, cls in METHODS.items():
        method = cls(TrainConfig(method=name))
        assert isinstance(method, Method)
        assert (method.condition_spec is not None) == cls.takes_condition, name
        assert all(option in TrainConfig.__dataclass_fields__ for option in cls.options), name
        assert cls.prepare is not Method.prepare and cls.save_weights is not Method.save_weights, name
