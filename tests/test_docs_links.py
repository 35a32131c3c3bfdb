"""Relative links in README, docs/ and the committed benchmark reports point to files that
exist and, for a ``#fragment`` into a Markdown file, to a heading it has (GitHub's anchors)."""
from __future__ import annotations

import re
import subprocess
import unicodedata
from pathlib import Path
from typing import List, Optional, Set, Tuple

from helpers import REPO_ROOT

LINK = re.compile(r'\]\(([^)\s]+)\)')


def github_anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, letters / digits / ``_`` / ``-`` / spaces kept
    (other punctuation and symbols such as ``:``, ``−`` or ``×`` dropped), spaces to ``-``."""
    kept = ''.join(c for c in heading.strip().lower()
                   if c in '- ' or unicodedata.category(c)[0] in 'LMN'
                   or unicodedata.category(c) == 'Pc')
    return kept.replace(' ', '-')


def anchors(markdown: Path) -> Set[str]:
    """Anchors of every heading outside code blocks; repeats get ``-1``, ``-2`` … as on GitHub."""
    seen: dict = {}
    result = set()
    in_code = False
    for line in markdown.read_text(encoding='utf-8').splitlines():
        if line.startswith('```'):
            in_code = not in_code
            continue
        match = re.match(r'#{1,6} (.*)', line)
        if match and not in_code:
            anchor = github_anchor(match.group(1))
            count = seen.get(anchor, 0)
            seen[anchor] = count + 1
            result.add(anchor if count == 0 else f'{anchor}-{count}')
    return result


def committed_files(root: Path) -> Optional[Set[Path]]:
    """The files git tracks under ``root`` (a link to an untracked file works here but not in a
    clone), or None outside a git checkout."""
    try:
        out = subprocess.run(['git', 'ls-files', '-z'], cwd=root, capture_output=True,
                             check=True).stdout.decode()
    except (OSError, subprocess.CalledProcessError):
        return None
    return {(root / name).resolve() for name in out.split('\0') if name}


def broken_links(markdown: Path, tracked: Optional[Set[Path]] = None) -> List[Tuple[str, str]]:
    """``(link, why)`` for each relative link of ``markdown`` that leads nowhere (or, given
    ``tracked``, to a file or folder that holds no tracked file)."""
    broken = []
    for match in LINK.finditer(markdown.read_text(encoding='utf-8')):
        link = match.group(1)
        if link.startswith(('http://', 'https://', 'mailto:')):
            continue
        path, _, fragment = link.partition('#')
        target = (markdown.parent / path).resolve() if path else markdown.resolve()
        if not target.exists():
            broken.append((link, 'no such file'))
        elif tracked is not None and target not in tracked and not any(
                target in f.parents for f in tracked):
            broken.append((link, 'not committed'))
        elif fragment and target.suffix == '.md' and fragment not in anchors(target):
            broken.append((link, f'no heading with anchor #{fragment} in {target.name}'))
    return broken


def documents() -> List[Path]:
    return [REPO_ROOT / 'README.md', *sorted((REPO_ROOT / 'docs').glob('*.md')),
            *sorted((REPO_ROOT / 'benchmarks' / 'results').rglob('*.md'))]


def test_github_anchors_drop_punctuation_and_symbols() -> None:
    assert github_anchor('Detection main run: 4 seeds (2026-12-07)') == \
        'detection-main-run-4-seeds-2026-12-07'
    assert github_anchor('The main run (issue #27): rows, latency and figure') == \
        'the-main-run-issue-27-rows-latency-and-figure'
    assert github_anchor('Detection: Faster R-CNN R-18, −50 % backbone FLOPs') == \
        'detection-faster-r-cnn-r-18-50--backbone-flops'
    assert github_anchor('`make demo` report') == 'make-demo-report'


def test_a_broken_link_is_found(tmp_path: Path) -> None:
    (tmp_path / 'other.md').write_text('# Title\n\n## Part two\n\n## Part two\n')
    page = tmp_path / 'page.md'
    page.write_text('[a](other.md#part-two) [b](other.md#part-two-1) [c](#here)\n# Here\n'
                    '[d](other.md#part-three) [e](missing.md) [f](https://example.org/x#y)\n')
    assert broken_links(page) == [('other.md#part-three', 'no heading with anchor '
                                   '#part-three in other.md'), ('missing.md', 'no such file')]
    tracked = {(tmp_path / 'page.md').resolve()}
    assert ('other.md#part-two', 'not committed') in broken_links(page, tracked)


def test_documentation_links_lead_somewhere() -> None:
    tracked = committed_files(REPO_ROOT)
    problems = {str(doc.relative_to(REPO_ROOT)): broken_links(doc, tracked)
                for doc in documents()}
    assert {doc: links for doc, links in problems.items() if links} == {}
