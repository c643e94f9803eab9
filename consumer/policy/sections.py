"""A policy body's Markdown sections: the one parser of headings that validation, the examples
and the review console all read.

A heading is a line of one to six `#` and its title (`## VIOLATES (1)`); a section is the
heading and the lines up to the next heading. `Section.name` is the title's leading word,
upper-cased (`VIOLATES`): the name the guide's structure uses (INSTRUCTIONS, DEFINITIONS,
VIOLATES, SAFE, EXAMPLES), None for a title that starts with no letter.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_HEADING = re.compile(r"^(#{1,6})\s+(.+?)\s*$")
_NAME = re.compile(r"[A-Za-z]+")


@dataclass(frozen=True)
class Section:
    title: str  # as written: "VIOLATES (1)"
    level: int  # the number of `#`
    line: int  # the heading's line number
    heading: str  # the heading line itself
    body: list[tuple[int, str]]  # (line number, line) up to the next heading

    @property
    def name(self) -> str | None:
        word = _NAME.match(self.title)
        return word.group(0).upper() if word else None


def sections(text: str, first_line: int = 1) -> list[Section]:
    """Every section of `text` in order, lines numbered from `first_line`; lines before the first
    heading belong to none."""
    found: list[Section] = []
    for number, line in enumerate(text.splitlines(), start=first_line):
        heading = _HEADING.match(line)
        if heading:
            found.append(Section(heading.group(2), len(heading.group(1)), number, line, []))
        elif found:
            found[-1].body.append((number, line))
    return found
