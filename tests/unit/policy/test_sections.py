"""The one parser of a policy body's sections (consumer.policy.sections), and the readers built on it."""

from __future__ import annotations

from consumer.policy.examples import section_examples
from consumer.policy.sections import sections

BODY = """A line before any heading.
# Harassment
## VIOLATES (1)
- H1: threats
## 2. Numbered
- "not an example" -> 1
## EXAMPLES
- "you are great" -> 0
## 3. Still examples
- "I will find you" -> 1
"""


def test_each_heading_opens_a_section_named_by_its_first_word():
    found = sections(BODY, first_line=10)
    assert [(s.title, s.level, s.line, s.name) for s in found] == [
        ("Harassment", 1, 11, "HARASSMENT"),
        ("VIOLATES (1)", 2, 12, "VIOLATES"),
        ("2. Numbered", 2, 14, None),
        ("EXAMPLES", 2, 16, "EXAMPLES"),
        ("3. Still examples", 2, 18, None),
    ]
    assert found[1].body == [(13, "- H1: threats")]  # the line before any heading belongs to none


def test_a_heading_without_a_name_continues_the_examples_before_it():
    examples = section_examples(BODY, first_line=10)
    assert [(e.line, e.content, e.label) for e in examples] == [(17, "you are great", 0), (19, "I will find you", 1)]
