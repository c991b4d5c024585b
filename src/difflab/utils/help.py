"""``--help`` of the entry points: the README's table of configuration groups as plain text (one source: the table
in README.md; ``conf/hydra/default.yaml`` puts it in Hydra's help template through ``${config_groups_help:}``)."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

README = Path(__file__).resolve().parents[3] / "README.md"
SECTION = "## Configuration groups"


def _cells(line: str) -> list[str]:
    return [cell.strip() for cell in re.split(r"(?<!\\)\|", line.strip().strip("|"))]  # not at an escaped \|


def _plain(text: str) -> str:
    """Markdown cell → terminal text: no backticks or emphasis, ``\\|`` → ``|``."""
    return re.sub(r"[`*]", "", text.replace("\\|", "|"))


def config_groups_help(readme: str | Path = README, width: int = 100) -> str:
    """The groups table of ``readme``'s *Configuration groups* section and the paragraphs after it (the top-level
    keys), as indented plain text, with ``$`` doubled for Hydra's ``string.Template``. Without the README (an
    installed wheel) a pointer to it."""
    path = Path(readme)
    if not path.is_file() or SECTION not in (text := path.read_text()):
        return "See README.md, section 'Configuration groups'."
    section = text.split(SECTION, 1)[1].split("\n## ", 1)[0]
    out: list[str] = []
    rows = [line for line in section.splitlines() if line.startswith("|")]
    for line in rows[2:]:  # header and separator first
        group, options, notes = (_plain(c) for c in _cells(line)[:3])
        out.append(f"{group}: {options}")
        if notes:
            out.extend(textwrap.wrap(notes, width, initial_indent="    ", subsequent_indent="    "))
    after = section.split(rows[-1], 1)[1] if rows else ""
    for paragraph in (p for p in after.split("\n\n") if p.strip()):
        out.append("")
        out.extend(textwrap.wrap(_plain(" ".join(paragraph.split())), width))
    return "\n".join(out).replace("$", "$$")
