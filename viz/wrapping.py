"""Greedy word wrap, for any way of measuring a line (print inches or screen pixels)."""

from __future__ import annotations

from collections.abc import Callable


def wrap_words(
    text: str, fits: Callable[[str], bool], max_lines: int, *, separator: str | None = None
) -> list[str]:
    """Lines of ``text`` (explicit line breaks kept), each as long as ``fits`` allows; a
    word too long for a line gets a line of its own. Lines beyond ``max_lines`` join the
    last one, which may then overflow. ``separator=" "`` keeps no-break spaces inside
    words; the default breaks at any whitespace."""
    lines: list[str] = []
    for paragraph in text.split("\n"):
        current = ""
        for word in paragraph.split(separator):
            if not word:
                continue
            trial = f"{current} {word}".strip()
            if not current or fits(trial):
                current = trial
            else:
                lines.append(current)
                current = word
        lines.append(current)
    if len(lines) > max_lines:
        lines = [*lines[: max_lines - 1], " ".join(lines[max_lines - 1 :])]
    return lines
