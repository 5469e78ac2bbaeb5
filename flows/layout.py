"""Where things are in a workspace: one property per place the flows read or write."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

from stages import params as P
from stages.artifacts import shipped_model

PROJECT_ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Workspace:
    root: Path

    @property
    def params_path(self) -> Path:
        return self.root / "params.yaml"

    @property
    def tracking_uri(self) -> str:
        return f"sqlite:///{self.root / 'mlflow.db'}"

    @property
    def artifacts(self) -> Path:
        return self.root / "mlartifacts"

    @property
    def as_merged(self) -> Path:
        """The merge's output, with the router as merged (what the merge's lineage registers)."""
        return self.root / "models" / "merged"

    @property
    def merged_model(self) -> Path:
        """The merged model as shipped: with the tuned router once stage tune_router made one."""
        return shipped_model(self.root / "models")

    @property
    def reports(self) -> Path:
        """Stage report's output: eval_table.md, report.html, the plots."""
        return self.root / "reports"

    @property
    def safety_results(self) -> Path:
        """Stage evaluate_safety's refusal rates per configuration (a stub when it is off)."""
        return self.root / "safety" / "results.json"

    def params(self) -> P.Params:
        return P.load(self.params_path)

    @property
    def source_record(self) -> Path:
        return self.root / SOURCE_RECORD

    def source(self) -> tuple[Path, str] | None:
        """(the params file, the preset) the workspace was last built from; None before one was recorded."""
        if not self.source_record.exists():
            return None
        record = yaml.safe_load(self.source_record.read_text())
        return Path(record["params"]), record["preset"]


# Which params file and preset built the workspace: where its opt-outs are edited (Git-ignored: a path of this machine).
SOURCE_RECORD = Path(".consort") / "source.yaml"
