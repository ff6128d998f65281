"""The pages a reader follows: every relative link and picture in the README, CONTRIBUTING.md and docs/ names a file
that exists, and every #anchor a heading of the page it points to (GitHub's heading anchors)."""
import glob
import os
import re

import pytest

from tests.helpers import ROOT

PAGES = sorted(["README.md", "CONTRIBUTING.md"] + [os.path.relpath(p, ROOT) for p in
                                                  glob.glob(os.path.join(ROOT, "docs", "**", "*.md"), recursive=True)])
LINK = re.compile(r"\]\(([^)\s]+)\)|<img [^>]*src=\"([^\"]+)\"")


def anchors(path):
    """The anchors GitHub gives a page's headings: lower case, punctuation dropped, spaces to '-', repeats -1, -2."""
    seen, out = {}, set()
    with open(path) as f:
        text = re.sub(r"```.*?```", "", f.read(), flags=re.S)  # no headings inside code blocks
    for heading in re.findall(r"^#{1,6} +(.+?) *#*$", text, flags=re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
        out.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
        seen[slug] = seen.get(slug, 0) + 1
    return out


def broken_links(page, root=ROOT):
    """A page's relative links and pictures whose file, or heading anchor, does not exist."""
    with open(os.path.join(root, page)) as f:
        text = re.sub(r"```.*?```", "", f.read(), flags=re.S)
    broken = []
    for target in (a or b for a, b in LINK.findall(text)):
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        full = os.path.normpath(os.path.join(root, os.path.dirname(page), path)) if path else os.path.join(root, page)
        if not os.path.exists(full):
            broken.append(f"{target}: no such file")
        elif anchor and full.endswith(".md") and anchor not in anchors(full):
            broken.append(f"{target}: no heading with that anchor")
    return broken


@pytest.mark.parametrize("page", PAGES)
def test_docs_links_name_files_and_headings_that_exist(page):
    broken = broken_links(page)
    assert not broken, f"{page}: " + "; ".join(broken)


def test_docs_broken_links_are_found(tmp_path):
    (tmp_path / "a.md").write_text("# Top\n[ok](b.md#one) [gone](c.md) [no anchor](b.md#two) [self](#top) "
                                   "<img src=\"pic.png\"> [web](https://example.org/x)\n```\n[in code](d.md)\n```\n")
    (tmp_path / "b.md").write_text("# One\n")
    assert broken_links("a.md", str(tmp_path)) == ["c.md: no such file", "b.md#two: no heading with that anchor",
                                                   "pic.png: no such file"]


def test_docs_anchors_follow_githubs_rule(tmp_path):
    page = tmp_path / "p.md"
    page.write_text("# Why the DETR baseline does not leave the plateau\n## SMCA's claim, in miniature\n## Notes\n"
                    "## Notes\n```\n# not a heading\n```\n")
    assert anchors(str(page)) == {"why-the-detr-baseline-does-not-leave-the-plateau", "smcas-claim-in-miniature",
                                  "notes", "notes-1"}
