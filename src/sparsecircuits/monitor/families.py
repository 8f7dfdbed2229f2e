"""Circuit families: named groups of tasks whose circuits the monitor watches together.

A families file is YAML (``version: 1``; ``families: {name: {description, tasks: [...]}}``).
The defaults ship as ``monitor/families.yaml``. Every task must be registered
(``sparsecircuits tasks`` lists them); an unknown task or field is a one-line ConfigError
naming the file and the field.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from sparsecircuits import tasks
from sparsecircuits.errors import ConfigError
from sparsecircuits.model.config import format_validation_error

DEFAULT_FAMILIES = Path(__file__).with_name("families.yaml")
_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]*$")


class Family(BaseModel):
    """One family: a description and its task names (at least one, no repeats)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    description: str = ""
    tasks: list[str] = Field(min_length=1)

    @field_validator("tasks")
    @classmethod
    def _known_tasks(cls, names: list[str]) -> list[str]:
        known = set(tasks.names(include_controls=False))
        for n in names:
            if n not in known:
                raise ValueError(f"unknown task {n!r} (see `sparsecircuits tasks`)")
        if len(set(names)) != len(names):
            raise ValueError("a task is listed twice")
        return names


class FamilySet(BaseModel):
    """The families file: ``{name: Family}``, names lower-case with ``-`` or ``_``."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    version: Literal[1] = 1
    families: dict[str, Family] = Field(min_length=1)

    @field_validator("families")
    @classmethod
    def _names(cls, fams: dict[str, Family]) -> dict[str, Family]:
        for name in fams:
            if not _NAME.match(name):
                raise ValueError(f"family name {name!r}: use lower-case letters, digits, - or _")
        return fams

    def task_names(self) -> list[str]:
        """Every task of every family, each once, in file order."""
        return list(dict.fromkeys(t for f in self.families.values() for t in f.tasks))


def read_yaml(path: Path, *, raw: bytes | None = None) -> Any:
    """Parse a YAML file (or ``raw``, its bytes already read: what was hashed is what is
    parsed); a missing or malformed file is a one-line ConfigError."""
    try:
        return yaml.safe_load(path.read_bytes() if raw is None else raw)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except (OSError, yaml.YAMLError) as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ConfigError(f"{path}: not a readable YAML file ({first})") from None


def load_families(path: str | Path | None = None) -> FamilySet:
    """Read and validate a families file (default: the shipped ``families.yaml``)."""
    path = Path(path) if path is not None else DEFAULT_FAMILIES
    data = read_yaml(path)
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping with 'version' and 'families'")
    try:
        return FamilySet.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, source=str(path))) from None
