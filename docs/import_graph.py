"""The package import graph of shared/, cloud/ and edge_agent/ as a Mermaid flowchart.

``python docs/import_graph.py`` prints it; ``--write`` puts it into docs/architecture.md between
its markers (tests/test_architecture.py fails when the committed picture is out of date).
Nodes are packages (``cloud.plane``) and top-level modules (``cloud.registry``); edges into
``shared`` are left out (every package imports the wire contract, and it imports neither side).
Built with grimp, the graph library import-linter checks the contracts with.
"""

from __future__ import annotations

import sys
from pathlib import Path

import grimp

DOC = Path(__file__).resolve().parent / "architecture.md"
START, END = "<!-- import-graph:start -->", "<!-- import-graph:end -->"


def node(module: str) -> str:
    parts = module.split(".")
    return "shared" if parts[0] == "shared" else ".".join(parts[:2])


def edges() -> list[tuple[str, str]]:
    graph = grimp.build_graph("shared", "cloud", "edge_agent")
    found = set()
    for module in graph.modules:
        for imported in graph.find_modules_directly_imported_by(module):
            a, b = node(module), node(imported)
            if a != b:
                found.add((a, b))
    # Package __init__ modules re-exporting their own parts show up as edges to the root: drop.
    return sorted((a, b) for a, b in found if a not in ("cloud", "edge_agent"))


def mermaid() -> str:
    lines = ["```mermaid", "flowchart LR"]
    for side in ("edge_agent", "cloud"):
        names = sorted({n for e in edges() for n in e if n.startswith(side + ".")})
        lines.append(f"  subgraph {side}")
        lines.extend(f"    {n.replace('.', '_')}[{n.split('.', 1)[1]}]" for n in names)
        lines.append("  end")
    lines.extend(f"  {a.replace('.', '_')} --> {b.replace('.', '_')}" for a, b in edges() if b != "shared")
    lines.append("```")
    return "\n".join(lines)


def write() -> None:
    text = DOC.read_text()
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    DOC.write_text(f"{head}{START}\n{mermaid()}\n{END}{tail}")


if __name__ == "__main__":
    sys.path.insert(0, str(DOC.parents[1]))
    if "--write" in sys.argv:
        write()
    else:
        print(mermaid())
