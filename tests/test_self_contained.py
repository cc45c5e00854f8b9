"""The repository explains itself: no file points to notes that a clone does not have, and every
document a file cites exists — with the section it names.

Checked over the files git knows (tracked, plus untracked files that are not ignored — what the next
commit may add); binary files are skipped. A failure lists ``path:line`` and the offending line.

- outside references: the developers' private design and research notes, and the shared folder
  they lived in (explain the point in place, or cite ``docs/<name>.md, "<section title>"``);
- ``docs/<name>.md`` mentioned anywhere: the file must exist;
- a section cited by title — the document (``docs/<name>.md`` or the README), a comma, then the
  title in quotes: the file must have a heading with that title (a README heading may continue
  after the title, e.g. ``Accounting: FLOPs, …``);
- Markdown links ``[text](target)`` in ``.md`` files: a relative target must exist, and an anchor
  (``#slug``) must be a heading of the target, slugged as GitHub does.

The patterns are spelled in pieces (``"DESI" "GN"``) so that this file does not match itself.
"""

from __future__ import annotations

import os
import re
import subprocess
from functools import cache
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = "do" "cs/"  # the docs folder, spelled so that examples below are not citations themselves

# (pattern, what it points to). Case-sensitive on purpose: "design" and "Research" are words.
OUTSIDE = [
    (re.compile(r"\b" + "DESI" "GN" + r"\b"), "the private design notes"),
    (re.compile(r"(?<![\w-])" + "rese" "arch/"), "the private research notes folder"),
    (re.compile(r"\b" + "frame" "work" + r"\.md\b"), "a private research note"),
    (re.compile(r"\b" + "pe" "ers" + r"\.md\b"), "a private research note"),
    (re.compile(r"\b" + "pa" "per" + r"\.md\b"), "a private research note"),
    (re.compile(r"\.\./" + "sha" r"red\b"), "a folder outside the repository"),
    (re.compile(r"/work/" + "sha" r"red\b"), "a folder outside the repository"),
    (re.compile(r"\b" + "pit" "fall" + r" [A-Z][0-9]\b"), "a pitfall code of the private notes"),
]
URL = re.compile(r"https?://\S+")
DOC_MENTION = re.compile(r"(?<![\w/.-])docs/([\w.-]+\.md)")
# A document, a comma, a title in matching quotes ("…", '…', “…”, ‘…’); the title may wrap lines.
SECTION_CITATION = re.compile(
    r"(?<![\w/.-])(docs/[\w.-]+\.md|README(?:\.md)?),\s*"
    r"(?:\"(?P<t0>[^\"]{1,200}?)\"|'(?P<t1>[^']{1,200}?)'|“(?P<t2>[^”]{1,200}?)”|‘(?P<t3>[^’]{1,200}?)’)"
)
MD_LINK = re.compile(r"\[[^\]\n]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^\s*(```|~~~)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")


def git_files() -> list[str]:
    try:
        out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                             capture_output=True, check=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        pytest.skip("not a git checkout: the files of the repository are not known")
    return sorted({p for p in out.decode("utf-8", "surrogateescape").split("\0") if p and (REPO / p).is_file()})


@cache
def text_of(path: str) -> str | None:
    """The file's text, or None for a binary file."""
    data = (REPO / path).read_bytes()
    if b"\0" in data[:8192]:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def outside_references(text: str) -> list[tuple[int, str]]:
    """(line number, what it points to) for every line that refers to something outside the
    repository (several things on one line are named together)."""
    found = []
    for number, line in enumerate(text.splitlines(), 1):
        urls = [m.span() for m in URL.finditer(line)]
        whats = [what for pattern, what in OUTSIDE for m in pattern.finditer(line)
                 if not any(a <= m.start() < b for a, b in urls)]  # a public URL may say anything
        if whats:
            found.append((number, " and ".join(dict.fromkeys(whats))))
    return found


def plain(title: str) -> str:
    """A title as its text reads: code marks, Markdown escapes, line breaks and comment markers of a
    wrapped citation removed, spaces collapsed, lower case."""
    title = re.sub(r"\s*\n\s*(?:#+|//|\*)?\s*", " ", title)
    return " ".join(title.replace("`", "").replace("\\", "").split()).lower()


def slug(heading: str) -> str:
    """GitHub's anchor of a heading."""
    return re.sub(r"[^\w\- ]", "", heading.replace("`", "").lower()).replace(" ", "-")


def headings_in(text: str) -> list[str]:
    """The headings of Markdown text, outside fenced code."""
    out, fenced = [], False
    for line in text.splitlines():
        if FENCE.match(line):
            fenced = not fenced
        elif not fenced and (m := HEADING.match(line)):
            out.append(m.group(2))
    return out


@cache
def headings(path: str) -> list[str]:
    return headings_in(text_of(path) or "")


def line_of(text: str, offset: int) -> tuple[int, str]:
    number = text.count("\n", 0, offset) + 1
    return number, text.splitlines()[number - 1].strip()


def has_section(doc: str, title: str, prefix_ok: bool) -> bool:
    wanted = plain(title)
    for h in map(plain, headings(doc)):
        if h == wanted or (prefix_ok and h.startswith(wanted) and not h[len(wanted)].isalnum()):
            return True
    return False


def citation_problems(files: list[str], read=None) -> list[str]:
    """Problems with the documents and sections `files` cite; `read` (path → text or None) defaults
    to the files on disk."""
    read = read or text_of
    known = set(files)
    problems = []
    for path in files:
        text = read(path)
        if text is None:
            continue
        for m in DOC_MENTION.finditer(text):
            if f"docs/{m.group(1)}" not in known:
                n, line = line_of(text, m.start())
                problems.append(f"{path}:{n}: cites docs/{m.group(1)}, which is not in the repository: {line}")
        for m in SECTION_CITATION.finditer(text):
            doc = "README.md" if m.group(1).startswith("README") else m.group(1)
            title = next(v for k, v in m.groupdict().items() if v is not None)
            if doc in known and not has_section(doc, title, prefix_ok=doc == "README.md"):
                n, line = line_of(text, m.start())
                problems.append(f"{path}:{n}: {doc} has no section {plain(title)!r}: {line}")
        if path.endswith(".md"):
            problems += link_problems(path, text, known)
    return list(dict.fromkeys(problems))  # a doc cited twice on a line (text and link) is one problem


def link_problems(path: str, text: str, known: set[str]) -> list[str]:
    """Markdown links of `text` (the file `path`) whose target or anchor does not exist."""
    problems, fenced = [], False
    for number, line in enumerate(text.splitlines(), 1):
        if FENCE.match(line):
            fenced = not fenced
        if fenced:
            continue
        for m in MD_LINK.finditer(line):
            target = m.group(1)
            if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto: ...
                continue
            file_part, _, anchor = target.partition("#")
            if not file_part:  # an anchor in this file
                anchors = {slug(h) for h in headings_in(text)}
                resolved = path
            else:
                resolved = os.path.normpath(os.path.join(os.path.dirname(path), file_part))
                if resolved not in known and not any(f.startswith(resolved + "/") for f in known):
                    problems.append(f"{path}:{number}: cites {resolved}, which is not in the repository: "
                                    f"{line.strip()}")
                    continue
                anchors = {slug(h) for h in headings(resolved)} if resolved.endswith(".md") else None
            if anchor and anchors is not None and anchor not in anchors:
                problems.append(f"{path}:{number}: link to {target}: {resolved} has no heading with anchor "
                                f"#{anchor}: {line.strip()}")
    return problems


# --------------------------------------------------------------------------- the checks
def test_no_file_refers_to_notes_outside_the_repository():
    problems = []
    for path in git_files():
        text = text_of(path)
        if text is None:
            continue
        lines = text.splitlines()
        for number, what in outside_references(text):
            problems.append(f"{path}:{number}: refers to {what}: {lines[number - 1].strip()}")
    assert not problems, (
        "files refer to notes a clone of the repository does not have; say the point in place or cite "
        "docs/<name>.md, \"<section title>\":\n" + "\n".join(problems))


def test_every_cited_document_and_section_exists():
    problems = sorted(citation_problems(git_files()), key=lambda p: (p.split(":")[0], int(p.split(":")[1])))
    assert not problems, "citations that lead nowhere:\n" + "\n".join(problems)


# --------------------------------------------------------------------------- the checks catch what they should
@pytest.mark.parametrize(
    "line",
    [
        "see " + "DESI" "GN" + " §8 for the contract",
        "(" + "DESI" "GN" + ".md, section 6)",
        "# (" + "frame" "work" + ".md, H1)",
        "documented in " + "rese" "arch/" + "notes.md",
        "(" + "pe" "ers" + ".md §1.2)",
        "cf. " + "pa" "per" + ".md",
        "read ../" + "sha" "red/notes.md",
        "cat /work/" + "sha" "red/x",
        "(" + "pit" "fall" + " L4)",
    ],
)
def test_an_outside_reference_is_caught(line):
    found = outside_references(f"first line\n{line}\n")
    assert [number for number, _ in found] == [2], found


@pytest.mark.parametrize(
    "line",
    [
        "dvlab-research/LISA and JIA-Lab-research/LISA#193",
        "facebookresearch/fvcore, arXiv:2403.06764 §5",
        "https://example.org/" + "rese" "arch/" + "pa" "per.md",
        "a design choice; Research on pruning",
        DOCS + 'pitfalls.md, "Hydra: a relative config_path"',
    ],
)
def test_public_and_own_references_pass(line):
    assert outside_references(line) == []


def test_a_missing_document_or_section_is_caught():
    files = git_files()
    fake = "tests/_citing.py"
    cited = (f"x = 1  # see {DOCS}no_such_doc.md\n"
             f'"""Why ({DOCS}pitfalls.md, "Hydra: a section\n    that does not exist").\n"""\n')
    problems = [p for p in citation_problems([*files, fake], read=lambda p: cited if p == fake else text_of(p))
                if p.startswith(fake)]
    assert any(p.startswith(f"{fake}:1: cites {DOCS}no_such_doc.md, which is not") for p in problems), problems
    if f"{DOCS}pitfalls.md" in files:
        assert any(p.startswith(f"{fake}:2: {DOCS}pitfalls.md has no section 'hydra: a section that does not exist'")
                   for p in problems), problems


def test_a_wrapped_citation_of_an_existing_section_passes():
    files = git_files()
    if f"{DOCS}pitfalls.md" not in files:
        pytest.skip("no pitfalls.md to cite")
    fake = "tests/_citing.py"
    cited = f'    # the config path breaks ({DOCS}pitfalls.md, "Hydra: a\n    # relative config_path").\n'
    problems = citation_problems([*files, fake], read=lambda p: cited if p == fake else text_of(p))
    assert not [p for p in problems if p.startswith(fake)], problems


def test_markdown_links_and_anchors_are_checked():
    known = set(git_files())
    text = ("# Notes\n"
            f"[a](README.md#no-such-heading) [b]({DOCS}none.md) [c](https://example.org/x.md) [d](#notes) [e](#gone)\n")
    problems = link_problems("NOTES.md", text, known)
    assert len(problems) == 3, problems  # a, b and e; the URL is not followed
    assert "README.md has no heading with anchor #no-such-heading" in problems[0]
    assert f"cites {DOCS}none.md, which is not in the repository" in problems[1]
    assert "NOTES.md has no heading with anchor #gone" in problems[2]
