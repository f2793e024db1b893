"""What every compression rule (threshold rules, bit rules) shares: a name and settings that MODEL.json records."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar


class RecordedRule(ABC):
    """A rule recorded in ``MODEL.json`` as ``{"name": ..., "settings": {...}}``."""

    #: The rule's name in ``MODEL.json``.
    name: ClassVar[str]

    @property
    @abstractmethod
    def settings(self) -> dict:
        """The rule's parameters (its constructor's keyword arguments), JSON-able."""

    def record(self) -> dict:
        """``{"name": ..., "settings": {...}}``, as ``MODEL.json`` records the rule."""
        return {"name": self.name, "settings": self.settings}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.settings.items())})"
