"""The layout is the architecture: imports run one way and never in a circle.

Read from the source (``ast``), so every import counts, including those inside functions:
- no import circle among the modules of ``callbridge`` and ``dia2``;
- ``dia2`` never imports ``callbridge``; callbridge imports only ``dia2``'s declared public API
  (names in ``dia2.__all__``, from ``dia2`` itself);
- inside callbridge, layers import downwards only: cli → web, sim → transports → (calls, voicecheck) →
  (tts, audio, voices, speech, cluster, startup) → (config, metrics);
- the simulator imports nothing of the service (it exists to check the service from outside).
"""

from __future__ import annotations

import ast
from pathlib import Path

import dia2

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("callbridge", "dia2")

# Rank of each part of callbridge: a module may import modules of its own rank or lower.
RANKS: dict[str, int] = {
    "callbridge.cli": 6,
    "callbridge.__main__": 6,
    "callbridge.web": 5,
    "callbridge.sim": 5,
    "callbridge.transports": 4,
    "callbridge.calls": 3,
    "callbridge.voicecheck": 3,
    "callbridge.tts": 2,
    "callbridge.audio": 2,
    "callbridge.voices": 2,
    "callbridge.startup": 2,
    "callbridge.speech": 2,
    "callbridge.cluster": 2,
    "callbridge.examples": 1,  # user-side code (an agent): imports nothing of the service
    "callbridge.config": 1,
    "callbridge.metrics": 1,
    "callbridge": 1,  # the package's own __init__
}

# Imports that break the layering today and are being removed; each entry must still exist
# (a stale entry fails too), so the list can only shrink.
KNOWN_VIOLATIONS: set[tuple[str, str]] = set()


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """Modules of ours that ``name`` imports (``from pkg import mod`` counts as ``pkg.mod``)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    is_pkg = path.name == "__init__.py"
    base = name.split(".") if is_pkg else name.split(".")[:-1]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                stem = base[: len(base) - node.level + 1]
                mod = ".".join(stem + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in known else mod for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:  # `import a.b.c` of a name inside a module
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def graph() -> dict[str, set[str]]:
    mods = all_modules()
    known = set(mods)
    return {name: imports_of(name, path, known) for name, path in mods.items()}


def rank(module: str) -> int:
    best = max((p for p in RANKS if module == p or module.startswith(p + ".")), key=len)
    return RANKS[best]


def test_no_import_circle() -> None:
    g = graph()
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    stack: list[str] = []
    circles: list[list[str]] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(g.get(node, ())):
            if dep.startswith(node + "."):
                continue  # a package importing its own submodules is not a circle
            if state.get(dep) == 1:
                circles.append(stack[stack.index(dep):] + [dep])
            elif dep not in state:
                visit(dep)
        stack.pop()
        state[node] = 2

    for node in sorted(g):
        if node not in state:
            visit(node)
    assert not circles, "import circles:\n" + "\n".join(" -> ".join(c) for c in circles)


def test_dia2_never_imports_callbridge() -> None:
    bad = [(m, d) for m, deps in graph().items() if m.startswith("dia2") for d in deps if d.startswith("callbridge")]
    assert not bad, bad


def test_callbridge_uses_only_dia2_public_api() -> None:
    public = set(dia2.__all__)
    bad: list[str] = []
    for path in sorted((ROOT / "callbridge").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "dia2":
                if node.module != "dia2":
                    bad.append(f"{path.relative_to(ROOT)}: from {node.module} import …")
                bad += [f"{path.relative_to(ROOT)}: dia2.{a.name} is not public" for a in node.names
                        if a.name not in public]
            elif isinstance(node, ast.Import):
                bad += [f"{path.relative_to(ROOT)}: import {a.name}" for a in node.names
                        if a.name.startswith("dia2.")]
    assert not bad, "\n".join(bad)


def test_dia2_public_names_exist() -> None:
    missing = [n for n in dia2.__all__ if not hasattr(dia2, n)]
    assert not missing, missing


def test_callbridge_layers_import_downwards() -> None:
    seen: set[tuple[str, str]] = set()
    bad: list[str] = []
    for mod, deps in graph().items():
        if not mod.startswith("callbridge"):
            continue
        for dep in deps:
            if not dep.startswith("callbridge") or dep.startswith(mod + "."):
                continue
            if rank(dep) > rank(mod):
                if (mod, dep) in KNOWN_VIOLATIONS:
                    seen.add((mod, dep))
                else:
                    bad.append(f"{mod} (rank {rank(mod)}) imports {dep} (rank {rank(dep)})")
    assert not bad, "\n".join(bad)
    assert seen == KNOWN_VIOLATIONS, f"fixed, remove from KNOWN_VIOLATIONS: {sorted(KNOWN_VIOLATIONS - seen)}"


def test_simulator_imports_nothing_of_the_service() -> None:
    bad = [(m, d) for m, deps in graph().items() if m.startswith("callbridge.sim")
           for d in deps if d.startswith("callbridge") and not d.startswith("callbridge.sim")]
    assert not bad, bad


def _assignments_and_calls(path: Path) -> tuple[set[str], set[str]]:
    """Module-level names assigned in ``path``, and names called anywhere in it."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    assigned = {t.id for node in tree.body if isinstance(node, ast.Assign | ast.AnnAssign)
                for t in (node.targets if isinstance(node, ast.Assign) else [node.target]) if isinstance(t, ast.Name)}
    called = {node.func.id if isinstance(node.func, ast.Name) else node.func.attr for node in ast.walk(tree)
              if isinstance(node, ast.Call) and isinstance(node.func, ast.Name | ast.Attribute)}
    return assigned, called


def test_one_rule_in_one_place() -> None:
    """Each rule of the service is written once (the simulator keeps its own copies by design:
    it checks the service from outside): the 20 ms chunk constants in ``audio/g711.py``, the
    sampling settings → ``GenerationConfig`` in ``tts/generation.py``, the fade-out in ``audio/convert.py``,
    the pending marks in ``calls/playout.py``."""
    owners = {"CHUNK_BYTES": "callbridge/audio/g711.py", "CHUNK_MS": "callbridge/audio/g711.py",
              "ULAW_SILENCE": "callbridge/audio/g711.py"}
    bad: list[str] = []
    for path in sorted((ROOT / "callbridge").rglob("*.py")):
        rel = str(path.relative_to(ROOT))
        if rel.startswith("callbridge/sim/"):
            continue
        assigned, called = _assignments_and_calls(path)
        bad += [f"{rel} defines {name} (it lives in {owners[name]})" for name in assigned & owners.keys()
                if owners[name] != rel]
        if "GenerationConfig" in called and rel != "callbridge/tts/generation.py":
            bad.append(f"{rel} builds a GenerationConfig (use callbridge.tts.generation_config)")
        source = path.read_text(encoding="utf-8")
        if "def fade_out" in source and rel != "callbridge/audio/convert.py":
            bad.append(f"{rel} has its own fade-out (use callbridge.audio.fade_out_chunk)")
        if "pending_marks" in source:
            bad.append(f"{rel} tracks pending marks (the call's playout does)")
    assert not bad, "\n".join(bad)


def test_names_that_do_not_collide() -> None:
    """A worker's "run this on your thread" is not a phone call, and a call's playback epoch is
    not the TTS generation (its config is ``generation_config``)."""
    from callbridge import tts
    from callbridge.calls.call import Call

    assert not hasattr(tts.TtsWorker, "call") and not hasattr(tts, "_Call")
    assert not hasattr(Call, "generation") and not hasattr(Call, "generation_config")
