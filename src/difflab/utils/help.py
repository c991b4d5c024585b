"""``--help`` of the entry points: the README's table of configuration groups as plain text (one source: the table
in README.md; ``conf/hydra/default.yaml`` puts it in Hydra's help template through ``${config_groups_help:}``)."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import yaml

README = Path(__file__).resolve().parents[3] / "README.md"
CONF = README.parent / "conf"
SECTION = "## Configuration groups"
NOT_CHOSEN = {"hydra", "experiment_net", "experiment_scale"}  # set by Hydra or derived from other choices


def script_groups(config_name: str, conf: Path = CONF) -> list[str]:
    """The config groups ``conf/<config_name>.yaml`` chooses from (its defaults list), in its order."""
    path = conf / f"{config_name}.yaml"
    if not path.is_file():
        return []
    groups = []
    for entry in (yaml.safe_load(path.read_text()) or {}).get("defaults", []):
        if isinstance(entry, dict):
            group = next(iter(entry)).removeprefix("optional ").removeprefix("override ").strip()
            if group not in NOT_CHOSEN and "/" not in group:
                groups.append(group)
    return groups


def config_groups(config_name: str, conf: Path = CONF) -> str:
    """``${config_groups:NAME}``: ``group: option, option`` for each group the script's config chooses from (Hydra's
    own listing shows every group of the search path, the training ones in ``sample.py --help`` too)."""
    lines = []
    for group in script_groups(config_name, conf):
        options = sorted(p.relative_to(conf / group).with_suffix("").as_posix() for p in (conf / group).rglob("*.yaml"))
        lines.append(f"{group}: {', '.join(options)}")
    return "\n".join(lines)


def _cells(line: str) -> list[str]:
    return [cell.strip() for cell in re.split(r"(?<!\\)\|", line.strip().strip("|"))]  # not at an escaped \|


def _plain(text: str) -> str:
    """Markdown cell → terminal text: no backticks or emphasis, ``\\|`` → ``|``."""
    return re.sub(r"[`*]", "", text.replace("\\|", "|"))


def config_groups_help(config_name: str | None = None, readme: str | Path = README, width: int = 100) -> str:
    """The groups table of ``readme``'s *Configuration groups* section (only the groups ``config_name`` chooses from,
    when given) and the paragraphs after it (the top-level keys), as indented plain text, with ``$`` doubled for
    Hydra's ``string.Template``. Without the README (an installed wheel) a pointer to it."""
    used = set(script_groups(config_name)) if config_name else None
    path = Path(readme)
    if not path.is_file() or SECTION not in (text := path.read_text()):
        return "See README.md, section 'Configuration groups'."
    section = text.split(SECTION, 1)[1].split("\n## ", 1)[0]
    out: list[str] = []
    rows = [line for line in section.splitlines() if line.startswith("|")]
    for line in rows[2:]:  # header and separator first
        group, options, notes = (_plain(c) for c in _cells(line)[:3])
        if used is not None and group not in used:
            continue
        out.append(f"{group}: {options}")
        if notes:
            out.extend(textwrap.wrap(notes, width, initial_indent="    ", subsequent_indent="    "))
    after = section.split(rows[-1], 1)[1] if rows else ""
    for paragraph in (p for p in after.split("\n\n") if p.strip()):
        out.append("")
        out.extend(textwrap.wrap(_plain(" ".join(paragraph.split())), width))
    return "\n".join(out).replace("$", "$$")
