#!/usr/bin/env python3
"""Fails when the crate's modules depend on each other the wrong way.

Herald's top-level modules sit in layers, from the pure types at the bottom
to the entry points at the top (see LAYERS). A module may use modules of
its own layer or below, never one above, and no set of modules may use
each other in a circle. A module's uses are the `crate::…` paths in its
files (a directory module's files included), leaving out comments and the
`#[cfg(test)]` module at the end of a file.

Usage: scripts/check-layers.py [--graph]   (run from the repository root)
"""

import pathlib
import re
import sys

# Bottom to top.
LAYERS = [
    ("foundation", ["config", "files", "rate", "stall", "telemetry"]),
    ("pure types", ["topic", "payload", "protocol", "auth", "event"]),
    ("store, relay, mailboxes, presence", ["store", "relay", "mailbox", "presence"]),
    ("delivery and the node's core", ["pipeline", "broker", "state", "registrations"]),
    ("edges", ["http", "ws"]),
    ("entry points", ["startup", "dev", "cli"]),
]

SRC = pathlib.Path("src")
USE_GROUP = re.compile(r"crate::\{([^}]*)\}")
USE_PATH = re.compile(r"crate::([a-z_][a-z0-9_]*)")


def files_of(module):
    single = SRC / f"{module}.rs"
    if single.exists():
        return [single]
    return sorted((SRC / module).rglob("*.rs"))


def code_of(path):
    text = path.read_text()
    cut = text.find("#[cfg(test)]")
    if cut >= 0:
        text = text[:cut]
    # Comments (doc links included) are not uses.
    return "\n".join(line.split("//", 1)[0] for line in text.splitlines())


def uses_of(module, known):
    used = set()
    for path in files_of(module):
        code = code_of(path)
        for group in USE_GROUP.findall(code):
            for item in group.split(","):
                name = item.strip().split("::", 1)[0]
                if name:
                    used.add(name)
        used.update(USE_PATH.findall(code))
    return {m for m in used if m in known and m != module}


def cycles(graph):
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def main():
    rank = {m: i for i, (_, modules) in enumerate(LAYERS) for m in modules}
    declared = set(re.findall(r"^pub mod (\w+);", (SRC / "lib.rs").read_text(), re.M))
    problems = []
    for module in sorted(declared - rank.keys()):
        problems.append(f"module `{module}` is in no layer: add it to LAYERS in {sys.argv[0]}")
    for module in sorted(rank.keys() - declared):
        problems.append(f"LAYERS names `{module}`, which src/lib.rs does not declare")
    layered = declared & rank.keys()
    graph = {m: uses_of(m, layered) for m in sorted(layered)}
    for module, used in graph.items():
        for other in sorted(used):
            if rank[other] > rank[module]:
                problems.append(
                    f"`{module}` ({LAYERS[rank[module]][0]}) uses `{other}`, "
                    f"a layer above ({LAYERS[rank[other]][0]})"
                )
    for component in cycles(graph):
        problems.append("modules use each other in a circle: " + ", ".join(component))
    if "--graph" in sys.argv:
        for name, modules in reversed(LAYERS):
            print(f"{name}:")
            for m in modules:
                print(f"  {m} -> {' '.join(sorted(graph.get(m, ()))) or '(nothing)'}")
    if problems:
        print("\n".join(problems), file=sys.stderr)
        return 1
    print(f"layers: {len(graph)} modules in {len(LAYERS)} layers, no use runs up, no circle")
    return 0


if __name__ == "__main__":
    sys.exit(main())
