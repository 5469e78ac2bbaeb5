"""The import contract that import-linter cannot derive: library modules never import a stage's
entry point (the modules dvc.yaml's commands run), so a stage's code is its module and the
library, and a library change shows which stages it reaches."""
import re
from pathlib import Path

import grimp
import yaml

PROJECT = Path(__file__).resolve().parents[1]


def test_no_library_module_imports_a_stage_entry_point():
    stages = yaml.safe_load((PROJECT / "dvc.yaml").read_text())["stages"]
    entries = {re.search(r"python -m ([\w.]+)", s.get("do", s)["cmd"]).group(1) for s in stages.values()}
    graph = grimp.build_graph("stages", "tracing", "flows")
    assert entries <= graph.modules
    library = {m for m in graph.modules if m.startswith(("stages.", "tracing.")) and m not in entries}
    assert "stages.train.loop" in library and "tracing.index" in library
    found = sorted(f"{m} -> {e}" for m in library for e in entries if graph.direct_import_exists(importer=m, imported=e))
    assert not found, f"library code imports stage entry points (move what it needs into a library module): {found}"
