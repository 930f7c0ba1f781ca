"""The architecture as the code has it: layers that imports never climb, no import cycle, every module at
most 400 lines and every function at most 60 (or saying why it is longer), a docstring on every module,
and docs/design.md's module map equal to the code's."""

from __future__ import annotations

import ast

import layout


def test_no_import_reaches_a_higher_layer_and_none_forms_a_cycle() -> None:
    found = layout.modules()
    assert len(found) > 60
    assert layout.upward_imports(found) == []
    assert layout.cycles(found) == []


def test_the_layers_hold_every_unit_and_a_unit_is_caught_climbing() -> None:
    """Every unit of the package stands on a layer; an import from a lower layer to a higher one is named."""
    found = layout.modules()
    assert {m.unit for m in found.values()} - {"dcgan"} == {unit for units in layout.LAYERS for unit in units}
    step = found["dcgan.gan.step"]
    climbing = dict(found, **{step.name: layout.Module(step.name, step.path, "", step.imports | {"dcgan.train.loop"})})
    assert layout.upward_imports(climbing) == ["dcgan.gan.step imports dcgan.train.loop"]


def test_modules_and_functions_stay_short_and_every_module_says_what_it_is_for() -> None:
    """At most 400 lines a module; at most 60 lines a function, unless a comment on its first line says
    why it is longer."""
    long_modules, long_functions, undocumented = [], [], []
    for module in layout.modules().values():
        text = module.path.read_text()
        if len(text.splitlines()) > 400:
            long_modules.append(module.name)
        tree = ast.parse(text)
        if not ast.get_docstring(tree):
            undocumented.append(module.name)
        lines = text.splitlines()
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1  # type: ignore[operator]
                if length > 60 and "# long:" not in lines[node.lineno - 1]:
                    long_functions.append(f"{module.name}.{node.name} ({length} lines)")
    assert long_modules == []
    assert long_functions == []
    assert undocumented == []


def test_design_md_holds_the_module_map_of_the_code() -> None:
    design = layout.DESIGN.read_text()
    written = design[design.index(layout.BEGIN) : design.index(layout.END) + len(layout.END)]
    assert written == layout.module_map(layout.modules()), "run: python tests/support/layout.py --write"
