"""The layers' imports. The gateway asks the services through their published interfaces
(their ports, the shared volumes) and shares code with them only through the shared core
(secumail/), never by importing a service's modules; the shared core imports neither, and
no service imports the gateway. The protocols (secumail/protocols/) sit under the
connections and are used by the runtime, the filters and the metrics, never the reverse."""

from __future__ import annotations

import ast
from pathlib import Path, PurePosixPath

import pytest

ROOT = Path(__file__).resolve().parents[2]

# layer (a folder) -> the packages and modules it must not import
FORBIDDEN = {
    "gateway": ("services",),
    "secumail": ("services", "gateway"),
    "services": ("gateway",),
    "secumail/protocols": ("secumail.runtime", "secumail.metrics", "secumail.filter"),
}


def imported_modules(source: str, path: PurePosixPath) -> list[tuple[int, str]]:
    """(line, module) of every import in `source`, the file at `path` (relative to the
    project), at any depth (in functions too). `from a import b` counts as `a` and as
    `a.b` (b may be a module); relative imports are resolved against the file's package."""
    package = path.parent.parts
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(source, filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:
                base = ".".join(package[: len(package) - node.level + 1])
                module = f"{base}.{module}" if module else base
            found.append((node.lineno, module))
            found += [(node.lineno, f"{module}.{alias.name}") for alias in node.names]
    return found


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_a_layer_imports_no_layer_it_must_not(layer: str) -> None:
    files = sorted((ROOT / layer).rglob("*.py"))
    assert files, f"no Python files under {layer}/"
    wrong = []
    for file in files:
        relative = PurePosixPath(file.relative_to(ROOT).as_posix())
        wrong += [f"{relative}:{line}: imports {module}"
                  for line, module in imported_modules(file.read_text(), relative)
                  if any(module == no or module.startswith(no + ".")
                         for no in FORBIDDEN[layer])]
    assert wrong == []


def test_every_form_of_import_is_seen() -> None:
    source = (
        "import os, services.policy.engine\n"
        "from services.dkim import milter\n"
        "def later() -> None:\n"
        "    from services import policy\n"
        "from .. import context\n"
        "from ..models import Problem\n"
    )
    found = imported_modules(source, PurePosixPath("gateway/routers/example.py"))
    assert (1, "services.policy.engine") in found
    assert (2, "services.dkim") in found
    assert (4, "services.policy") in found
    assert (5, "gateway.context") in found
    assert (6, "gateway.models") in found
