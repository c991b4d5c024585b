"""String-valued enums that config strings are converted to once, at construction."""

from __future__ import annotations

import enum
from typing import TypeVar

E = TypeVar("E", bound="StrEnumChoice")


class StrEnumChoice(str, enum.Enum):
    """A ``str`` enum whose members compare equal to their config spelling."""

    def __str__(self) -> str:  # pragma: no cover - trivial
        return self.value


def parse_enum(enum_cls: type[E], value: str | E, key: str) -> E:
    """Convert ``value`` to ``enum_cls`` or raise a ``ValueError`` naming the config ``key``.

    >>> from difflab.schedules import BetaSchedule
    >>> parse_enum(BetaSchedule, "linear", "schedule.beta_schedule")
    <BetaSchedule.LINEAR: 'linear'>
    """
    if isinstance(value, enum_cls):
        return value
    try:
        return enum_cls(str(value).lower())
    except ValueError:
        choices = ", ".join(m.value for m in enum_cls)
        raise ValueError(f"{key}={value!r}: expected one of [{choices}]") from None
