"""Versioned, frozen dataclass configs: one per stage, written next to every output.

Each stage module defines its own `@dataclass(frozen=True)` subclass of `StageConfig`; the resolved
config goes to `<output>/<stage>_config.json` so a result folder says exactly how it was made.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from .errors import DiffpruneError

T = TypeVar("T", bound="StageConfig")


@dataclasses.dataclass(frozen=True)
class StageConfig:
    """Base: `to_dict`/`from_dict` with a `version` and the stage name; unknown keys are refused."""

    stage: ClassVar[str] = "stage"
    version: ClassVar[int] = 1

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d = json.loads(json.dumps(d, default=str))  # tuples -> lists, Paths -> str
        return {"stage": self.stage, "version": self.version, **d}

    @classmethod
    def from_dict(cls: type[T], data: dict[str, Any]) -> T:
        data = dict(data)
        stage, version = data.pop("stage", cls.stage), data.pop("version", cls.version)
        if stage != cls.stage:
            raise DiffpruneError(f"config stage={stage!r} does not match {cls.stage!r}")
        if version != cls.version:
            raise DiffpruneError(f"{cls.stage} config version={version!r} is not supported; "
                                 f"this diffprune reads version {cls.version}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise DiffpruneError(f"{cls.stage} config has unknown keys {unknown}; allowed: {sorted(names)}")
        return cls(**data)

    def save(self, folder: str | Path) -> Path:
        path = Path(folder) / f"{self.stage}_config.json"
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path
