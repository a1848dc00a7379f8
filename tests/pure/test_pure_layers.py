"""The dependency direction of DESIGN.md holds: each part imports only what it may."""

from __future__ import annotations

import ast
from pathlib import Path

import edgewise

ROOT = Path(edgewise.__file__).parent

# DESIGN.md's table, plus the shared leaves it does not list: `protocol` (the wire
# contract control and agent both import), `drift` (statistics for device and server),
# `_httpd` (the small HTTP server of the agent and the local inference API) and
# `examples` (models built from packaged data, for the demo and the CLI).
MAY_IMPORT: dict[str, set[str]] = {
    "bundle": set(),
    "drift": set(),
    "events": set(),
    "_httpd": set(),
    "protocol": {"bundle"},
    "examples": {"bundle", "drift"},
    "runtime": {"bundle", "protocol", "_httpd"},
    "agent": {"bundle", "runtime", "events", "protocol", "drift", "_httpd"},
    "control": {"bundle", "events", "protocol", "drift"},
    "sim": {"agent", "control", "bundle", "protocol", "drift"},
    "web": {"control", "drift"},
    "demo": {"control", "sim", "agent", "bundle", "examples"},
    "cli": {"*"},
}


def _imports_at_load(path: Path) -> set[str]:
    """The edgewise parts a module imports when it is loaded.

    An import inside a function is left out: it is how a part offers an optional
    plug-in without depending on it (the control plane mounts the web console so).
    """
    found: set[str] = set()
    tree = ast.parse(path.read_text())
    body: list[ast.stmt] = list(tree.body)
    while body:
        node = body.pop()
        if isinstance(node, ast.If | ast.Try):
            body.extend(node.body + node.orelse)
            body.extend(h for handler in getattr(node, "handlers", []) for h in handler.body)
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names = [node.module]
            if node.module == "edgewise":
                names = [f"edgewise.{alias.name}" for alias in node.names]
        found.update(n.split(".")[1] for n in names if n.startswith("edgewise."))
    return found


def _part(path: Path) -> str:
    rel = path.relative_to(ROOT).parts
    return rel[0] if len(rel) > 1 else rel[0].removesuffix(".py")


def test_every_part_imports_only_what_the_design_allows() -> None:
    wrong = []
    for path in sorted(ROOT.rglob("*.py")):
        part = _part(path)
        if part == "__init__":
            continue
        allowed = MAY_IMPORT.get(part)
        assert allowed is not None, f"{part} is not in the table: add it to DESIGN.md's"
        if "*" in allowed:
            continue
        for target in _imports_at_load(path) - allowed - {part}:
            wrong.append(f"{path.relative_to(ROOT)} imports edgewise.{target}")
    assert not wrong, wrong


def test_the_check_sees_an_import_the_design_forbids(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text(
        "from __future__ import annotations\n"
        "import edgewise.control\n"
        "from edgewise.agent import x\n"
        "from edgewise import sim\n"
        "try:\n    from edgewise.web import y\nexcept ImportError:\n    pass\n"
        "def plugin():\n    from edgewise.cli import z\n"
    )
    assert _imports_at_load(module) == {"control", "agent", "sim", "web"}
