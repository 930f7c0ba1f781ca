"""The package's architecture, read from the code: which module imports which (at the top of a file or
inside a function alike), the layers the packages stand on, and the module map of docs/design.md.

    python tests/support/layout.py            # print the module map
    python tests/support/layout.py --write    # write it into docs/design.md, between its markers

tests/unit/test_layout.py holds the code to LAYERS (no import reaches a higher layer, no cycle among
modules) and docs/design.md's map to the code."""

from __future__ import annotations

import ast
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "dcgan"
DESIGN = ROOT / "docs" / "design.md"
BEGIN = "<!-- module map: written by `python tests/support/layout.py --write`; tests/unit/test_layout.py checks it -->"
END = "<!-- end of the module map -->"

LAYERS: list[tuple[str, ...]] = [
    ("errors", "seeds", "files", "pixels", "console", "config"),
    ("distributed",),
    ("gan", "data", "run"),
    ("evaluation",),
    ("train",),
    ("cluster",),
    ("cli", "__main__"),
]
"""Bottom to top: a unit (a top-level module, or a subpackage) may import units of its own layer's
lower layers only, and, within its layer, none that imports it back. What each layer is:
foundations that know nothing of training; many processes as one; the GAN, the data and a run on disk;
using and judging generators; training; clusters (preflight, benchmarks, SLURM); the command line."""

UNIT_DOCS = {
    "errors": "exit statuses and the errors that end a command in one line",
    "seeds": "the seed arithmetic that makes every random draw a function of (seed, step, rank)",
    "files": "writing a file so that no reader sees half of it",
    "pixels": "uint8 images <-> G's [-1, 1]",
    "console": "log format, progress line, plain-text tables",
    "config": "typed sections from YAML and key=value overrides",
}


@dataclass(frozen=True)
class Module:
    name: str  # dotted, e.g. dcgan.gan.step
    path: Path
    summary: str  # the docstring's first sentence
    imports: frozenset[str]  # dotted names of the project's modules it imports

    @property
    def unit(self) -> str:
        """The top-level module or subpackage it belongs to: `gan` for dcgan.gan.step, `errors` for dcgan.errors."""
        parts = self.name.split(".")
        return parts[1] if len(parts) > 1 else "dcgan"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def first_sentence(docstring: str | None) -> str:
    """Up to the first full stop that ends a sentence (not the one of "et al." or "e.g.")."""
    text = " ".join((docstring or "").split())
    end = text.find(". ")
    while end >= 0 and text[:end].endswith((" al", "e.g", "i.e", "vs")):
        end = text.find(". ", end + 1)
    return text if end < 0 else text[: end + 1]


def project_imports(tree: ast.Module, names: set[str]) -> frozenset[str]:
    """The project's modules an AST imports, wherever the import stands (`from dcgan.run import schema`
    is dcgan.run.schema)."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                submodule = f"{node.module}.{alias.name}"
                if submodule in names:
                    found.add(submodule)
                elif node.module in names:
                    found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name in names)
    return frozenset(found)


def modules() -> dict[str, Module]:
    paths = sorted(PACKAGE.rglob("*.py"))
    names = {module_name(path) for path in paths}
    found = {}
    for path in paths:
        tree = ast.parse(path.read_text())
        name = module_name(path)
        found[name] = Module(name, path, first_sentence(ast.get_docstring(tree)), project_imports(tree, names) - {name})
    return found


def layer_of(unit: str) -> int:
    for index, units in enumerate(LAYERS):
        if unit in units:
            return index
    raise KeyError(f"dcgan.{unit} is on no layer of tests/support/layout.py's LAYERS")


def upward_imports(found: dict[str, Module]) -> list[str]:
    """Imports that reach a higher layer, or a unit of the same layer that imports back."""
    wrong = []
    unit_edges = {(m.unit, found[i].unit) for m in found.values() for i in m.imports if found[i].unit != m.unit}
    for module in found.values():
        for imported in sorted(module.imports):
            a, b = module.unit, found[imported].unit
            if a == b or "dcgan" in (a, b):
                continue
            if layer_of(b) > layer_of(a) or (layer_of(b) == layer_of(a) and (b, a) in unit_edges):
                wrong.append(f"{module.name} imports {imported}")
    return wrong


def cycles(found: dict[str, Module]) -> list[list[str]]:
    """Import cycles among modules (each found once, from its smallest name)."""
    loops = []

    def visit(start: str, node: str, path: list[str]) -> None:
        for nxt in sorted(found[node].imports):
            if nxt == start:
                loops.append([*path, start])
            elif nxt > start and nxt not in path:
                visit(start, nxt, [*path, nxt])

    for name in sorted(found):
        visit(name, name, [name])
    return loops


def module_map(found: dict[str, Module]) -> str:
    """docs/design.md's map: the layers from the top, each unit with what it imports, its modules and
    their docstrings' first sentences."""
    lines = [BEGIN, ""]
    for index in reversed(range(len(LAYERS))):
        for unit in LAYERS[index]:
            members = sorted((m for m in found.values() if m.unit == unit), key=lambda m: m.name)
            if not members:
                continue
            uses = sorted({found[i].unit for m in members for i in m.imports} - {unit})
            package = members[0].name.startswith(f"dcgan.{unit}.") or len(members) > 1
            title = f"dcgan/{unit}/" if package else f"dcgan/{unit}.py"
            lines.append(f"**`{title}`** (layer {index}; imports {', '.join(uses) or 'nothing of the project'})")
            for module in members:
                if module.name == f"dcgan.{unit}" and package:
                    lines.append(f"  {module.summary}")
                    continue
                file = module.path.relative_to(PACKAGE / unit) if package else module.path.name
                lines.append(f"- `{file}`: {module.summary}")
            lines.append("")
    lines.append(END)
    return "\n".join(lines)


def write_map(text: str) -> None:
    design = DESIGN.read_text()
    start, end = design.index(BEGIN), design.index(END) + len(END)
    DESIGN.write_text(design[:start] + text + design[end:])


if __name__ == "__main__":
    text = module_map(modules())
    if sys.argv[1:] == ["--write"]:
        write_map(text)
    else:
        print(text)
