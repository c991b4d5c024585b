"""Small helpers shared by every subpackage (no imports of other difflab packages)."""

from difflab.utils.enums import StrEnumChoice, parse_enum

__all__ = ["StrEnumChoice", "parse_enum"]
