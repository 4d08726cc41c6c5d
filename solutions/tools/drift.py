"""Keep the Chinese pages in step with the English ones: everything that is not prose must agree.

    python -m solutions.tools.drift            check every page pair; exit 1 and name page and section on drift
    python -m solutions.tools.drift PAGE …     only these English pages (e.g. tutorial/05-lora-variants.md)

A Chinese page (``tutorial/zh-CN/<page>``, ``README.zh-CN.md``) translates the prose of its English page
and shares everything else. For each pair the check compares, section by section (a section is a heading
and what follows it up to the next heading):

- the headings: the same number, at the same levels, in the same order;
- the code blocks and display formulas ($$ … $$): the same, byte for byte, in the same order;
- each section's blocks (paragraphs, list items, table rows, quotes): the same number, and in each block the
  same inline code, inline formulas, numbers and link targets — as multisets, because Chinese word order
  is not English word order, and a number may move within its sentence but not to another paragraph;
- the generated sections (``<!-- generated: NAME -->``): the same names in the same order (their content
  comes from solutions/tools/docs.py for each language);
- ``<details>`` blocks (the layered hints): the same number per section.

A passage between ``<!-- untranslated -->`` and ``<!-- /untranslated -->`` belongs to one language only (the
English pages' link to their Chinese twins, the Chinese README's note on what it leaves to the English one)
and is left out on either side.

Links are compared by the file they reach, relative to the repository, so ``[…](02-lora-in-a-model.md)`` in
``tutorial/`` and in ``tutorial/zh-CN/`` (where it reaches the Chinese page 02) count as the same link when
the Chinese page exists, and ``../model/lora.py`` there must become ``../../model/lora.py``.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import PurePosixPath

from testcases.manifest import REPO

ZH = "zh-CN"
# English pages whose Chinese twin covers only their beginning: the twin ends before this heading
# (README.zh-CN.md: the quick start, the course map and the three journeys; the rest links to README.md).
PARTIAL = {"README.md": "## Commands"}
FENCE = re.compile(r"^(```|~~~)")
HEADING = re.compile(r"^(#{1,6})\s+(.*)$")
UNTRANSLATED = re.compile(r"<!-- untranslated -->.*?<!-- /untranslated -->\n?", re.DOTALL)
GENERATED = re.compile(r"<!-- generated: ([\w.-]+) -->\n.*?<!-- /generated -->", re.DOTALL)
INLINE_CODE = re.compile(r"`[^`]+`")
INLINE_MATH = re.compile(r"(?<![\\$])\$(?!\$)[^$]+?\$")
LINK = re.compile(r"\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
NUMBER = re.compile(r"(?<![\w.])[-−]?\d[\d,]*(?:\.\d+)?(?:e[-+]?\d+)?")


def english_pages() -> list[str]:
    """Every English page that has (or should have) a Chinese twin: the lessons, their map, the README."""
    return [
        "README.md",
        "tutorial/README.md",
        *sorted(p.relative_to(REPO).as_posix() for p in (REPO / "tutorial").glob("0*.md")),
    ]


def twin(page: str) -> str:
    """The Chinese page of an English one."""
    if page == "README.md":
        return f"README.{ZH}.md"
    path = PurePosixPath(page)
    return str(path.parent / ZH / path.name)


@dataclass
class Section:
    heading: str  # "## Learning goals" (level and text)
    level: int
    fenced: list[str] = field(default_factory=list)  # code blocks and display formulas, in order
    blocks: list[Counter] = field(default_factory=list)  # per block: inline atoms (multiset)
    generated: list[str] = field(default_factory=list)
    details: int = 0


def resolve(target: str, page: str) -> str:
    """A link target as the repository path it reaches; a Chinese page counts as its English twin.

    Anchors are dropped (a Chinese heading has another slug); a link to an anchor of the same page is "#".
    """
    if re.match(r"^[a-z]+:", target):
        return target
    path = target.partition("#")[0]
    if not path:
        return "#"
    parts: list[str] = []
    for part in (PurePosixPath(page).parent / path).parts:
        if part == "..":
            if parts:
                parts.pop()
        elif part != ".":
            parts.append(part)
    return "/".join(parts).replace(f"{ZH}/", "").replace(f".{ZH}.md", ".md")


def atoms(text: str, page: str) -> Counter:
    """The non-prose atoms of one block: inline code, inline formulas, numbers, link targets.

    A span may wrap across the block's lines (Markdown renders the line break as a space): the lines are
    joined first, and whitespace inside an atom counts as one space.
    """
    text = " ".join(text.split("\n"))
    found: list[str] = []
    for pattern, kind in ((INLINE_CODE, "code"), (INLINE_MATH, "math")):
        found += [f"{kind}:{' '.join(m.group(0).split())}" for m in pattern.finditer(text)]
        text = pattern.sub(" ", text)
    found += [f"link:{resolve(m.group(1), page)}" for m in LINK.finditer(text)]
    text = LINK.sub("]", text)
    text = re.sub(r"<[^>]+>", " ", text)  # HTML tags are structure, not numbers
    found += [f"number:{m.group(0).replace('−', '-').replace(',', '')}" for m in NUMBER.finditer(text)]
    return Counter(found)


def parse(text: str, page: str) -> list[Section]:
    """The page as sections of comparable atoms (see the module docstring)."""
    text = UNTRANSLATED.sub("", text)
    sections = [Section("(top)", 0)]
    generated_spans = [(m.start(), m.end(), m.group(1)) for m in GENERATED.finditer(text)]
    lines, i, offset = text.split("\n"), 0, 0
    starts = []  # character offset of each line
    for line in lines:
        starts.append(offset)
        offset += len(line) + 1
    block: list[str] = []

    def flush() -> None:
        if block:
            joined = "\n".join(block)
            sections[-1].details += joined.count("<details>")
            found = atoms(joined, page)
            if found or joined.strip():
                sections[-1].blocks.append(found)
            block.clear()

    while i < len(lines):
        line, here = lines[i], starts[i]
        span = next((s for s in generated_spans if s[0] <= here < s[1]), None)
        if span:  # a generated section: only its name counts
            flush()
            sections[-1].generated.append(span[2])
            while i < len(lines) and starts[i] < span[1]:
                i += 1
            continue
        if FENCE.match(line.strip()) or line.strip().startswith("$$"):
            flush()
            closing = "$$" if line.strip().startswith("$$") else line.strip()[:3]
            body = [line]
            one_line = (
                closing == "$$" and line.strip() != "$$" and line.strip().endswith("$$") and len(line.strip()) > 4
            )
            i += 1
            while not one_line and i < len(lines):
                body.append(lines[i])
                if lines[i].strip().startswith(closing):
                    i += 1
                    break
                i += 1
            sections[-1].fenced.append("\n".join(body).strip())
            continue
        if m := HEADING.match(line):
            flush()
            sections.append(Section(line.strip(), len(m.group(1))))
            i += 1
            continue
        if not line.strip() or line.lstrip().startswith(("- ", "* ", "|", "> ")) or re.match(r"^\s*\d+\.\s", line):
            flush()  # a blank line, or a new list item / table row / quote line starts a new block
        if line.strip():
            block.append(line)
        i += 1
    flush()
    return sections


def compare(english: str, chinese: str, page: str, zh_page: str) -> list[str]:
    """Where the Chinese page drifted from the English one, one line per finding (page and section named)."""
    a, b = parse(english, page), parse(chinese, zh_page)
    if page in PARTIAL:
        a = a[: next((i for i, s in enumerate(a) if s.heading == PARTIAL[page]), len(a))]
    problems: list[str] = []
    levels_a, levels_b = [s.level for s in a], [s.level for s in b]
    if levels_a != levels_b:
        problems.append(
            f"{zh_page}: headings differ from {page}: {len(a) - 1} headings at levels {levels_a[1:]} in English, "
            f"{len(b) - 1} at {levels_b[1:]} here"
        )
        return problems
    for sa, sb in zip(a, b):
        where = f"{zh_page}, section {sb.heading!r} (English: {sa.heading!r})"
        if sa.fenced != sb.fenced:
            differ = next(((x, y) for x, y in zip(sa.fenced, sb.fenced) if x != y), None)
            detail = (
                f"first differing block starts {differ[0][:60]!r} vs {differ[1][:60]!r}"
                if differ
                else (f"{len(sa.fenced)} code blocks / formulas in English, {len(sb.fenced)} here")
            )
            problems.append(f"{where}: code blocks or display formulas differ: {detail}")
        if sa.generated != sb.generated:
            problems.append(f"{where}: generated sections {sa.generated} in English, {sb.generated} here")
        if sa.details != sb.details:
            problems.append(f"{where}: {sa.details} <details> blocks in English, {sb.details} here")
        if len(sa.blocks) != len(sb.blocks):
            problems.append(
                f"{where}: {len(sa.blocks)} paragraphs / list items / rows in English, {len(sb.blocks)} here"
            )
            continue
        for n, (x, y) in enumerate(zip(sa.blocks, sb.blocks), start=1):
            if x != y:
                missing, extra = sorted((x - y).elements()), sorted((y - x).elements())
                problems.append(
                    f"{where}, block {n}: missing {missing[:4]}{'…' if len(missing) > 4 else ''}, "
                    f"extra {extra[:4]}{'…' if len(extra) > 4 else ''}"
                )
    return problems


def untranslated(pages: list[str] | None = None) -> list[str]:
    """The English pages that have no Chinese twin yet (they are listed, not failed: a page is translated whole)."""
    return [page for page in pages or english_pages() if not (REPO / twin(page)).is_file()]


def check(pages: list[str] | None = None) -> list[str]:
    """Every drift between an English page and its Chinese twin, in words (pages without a twin are skipped)."""
    problems = []
    for page in pages or english_pages():
        zh_page = twin(page)
        if not (REPO / zh_page).is_file():
            continue
        problems += compare((REPO / page).read_text(), (REPO / zh_page).read_text(), page, zh_page)
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pages", nargs="*", help="English pages to check (default: all)")
    pages = parser.parse_args(argv).pages
    problems = check(pages)
    print("\n".join(problems) if problems else "the Chinese pages are in step with the English ones")
    if missing := untranslated(pages):
        print(f"not translated yet (no Chinese twin): {', '.join(missing)}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
