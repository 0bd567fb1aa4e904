"""The package's shape: no import cycles between its modules; the CLI starts without torch."""

import ast
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "slimlm"


def _module_imports() -> dict[str, set[str]]:
    """module -> the slimlm modules it imports at module level (imports inside functions are lazy on purpose)."""
    mods = {}
    for p in SRC.rglob("*.py"):
        parts = p.relative_to(SRC.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        mods[name] = p
    edges = {m: set() for m in mods}
    for m, p in mods.items():
        package = m if p.name == "__init__.py" else m.rsplit(".", 1)[0]
        for node in ast.parse(p.read_text()).body:
            if isinstance(node, ast.ImportFrom):
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)] if node.level else []
                target = ".".join(base + ([node.module] if node.module else [])) if node.level else node.module
                for alias in node.names:
                    full = f"{target}.{alias.name}"
                    if full in mods:
                        edges[m].add(full)
                    elif target in mods:
                        edges[m].add(target)
            elif isinstance(node, ast.Import):
                edges[m] |= {a.name for a in node.names if a.name in mods}
    return edges


def test_no_import_cycles():
    edges = _module_imports()
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(m, path):
        state[m] = 1
        for n in sorted(edges[m]):
            assert state.get(n) != 1, "import cycle: " + " -> ".join(path + [n])
            if n not in state:
                visit(n, path + [n])
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m, [m])


def test_help_does_not_import_torch():
    code = "import sys; from slimlm.cli import main\ntry: main(['--help'])\nexcept SystemExit: pass\nprint('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "False"


def test_every_long_running_command_takes_quiet_and_json():
    """The same switches everywhere: every command that shows progress can be silenced, every command can print JSON."""
    import typer.main

    from slimlm.cli import build_app

    group = typer.main.get_command(build_app())
    long_running = {"importance", "prune", "search", "distill", "correct-teacher", "teacher-logits", "eval", "run",
                    "align"}
    for name, command in group.commands.items():
        options = {o for p in command.params for o in p.opts}
        assert "--json" in options, name
        if name in long_running:
            assert {"--quiet", "-q"} <= options, name
