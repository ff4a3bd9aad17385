"""The README is the front door (short, its links alive) and docs/ holds the depth: every
relative link and image in README.md and docs/*.md points at a file that exists, and at a
heading there when it names one."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set:
    return {slug(m.group(1)) for m in re.finditer(r"^#+ (.+)$", page.read_text(), re.M)}


def broken_links(pages) -> list[str]:
    bad = []
    for page in pages:
        for target in LINK.findall(page.read_text(encoding="utf-8")):
            if re.match(r"[a-z]+:", target):          # http(s), mailto: not checked here
                continue
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            if not dest.exists():
                bad.append(f"{page.relative_to(ROOT)}: {target} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                bad.append(f"{page.relative_to(ROOT)}: {target} (no such heading)")
    return bad


def test_a_broken_link_is_found(tmp_path, monkeypatch):
    page = tmp_path / "a.md"
    (tmp_path / "b.md").write_text("# Some Heading: here\n")
    page.write_text("[ok](b.md#some-heading-here) [gone](c.md) [no](b.md#other) "
                    "![img](b.md) [web](https://x.org/y)\n")
    monkeypatch.setattr(__import__(__name__), "ROOT", tmp_path)
    assert broken_links([page]) == ["a.md: c.md (no such file)",
                                    "a.md: b.md#other (no such heading)"]


def test_every_link_of_the_readme_and_the_docs_resolves():
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    assert len(pages) > 1
    bad = broken_links(pages)
    assert not bad, "\n".join(bad)


def test_the_readme_stays_a_front_door():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 250, f"README.md has {len(lines)} lines: move the depth to docs/"
    for page in sorted((ROOT / "docs").glob("*.md")):
        assert f"(docs/{page.name})" in "\n".join(lines), f"the README does not link {page}"
