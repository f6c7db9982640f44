"""MkDocs hook (mkdocs.yml ``hooks:``): links from docs/ pages to files elsewhere in the repository.

The pages are written for GitHub, where ``[x](../img/a.png)`` or ``[x](../src/boneage/report/SCHEMA.md)`` from
docs/ work as they are. The site holds only docs/, so here:

* an image outside docs/ (``../img/*.png``) is copied into the site under its repository path and the link points
  to that copy;
* a link to any other repository file becomes its text (or, with ``repo_url`` set in mkdocs.yml, a link to the
  file in the repository), so no link of the site points outside it.

A link to a file that does not exist is left alone: ``mkdocs build --strict`` then fails on it.
"""

from __future__ import annotations

import posixpath
import re
from pathlib import Path

from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parents[2]
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".gif", ".svg", ".webp"}
# [text](target) or ![alt](target), target without spaces; an optional #anchor
LINK = re.compile(r"(?P<bang>!?)\[(?P<text>[^\]\n]*)\]\((?P<target>[^)\s#]+)(?P<anchor>#[^)\s]*)?\)")
FENCE = re.compile(r"^(```|~~~).*?^\1", re.M | re.S)


def on_page_markdown(markdown, page, config, files, **kwargs):
    docs = Path(config["docs_dir"]).resolve()
    page_dir = (docs / page.file.src_uri).parent

    def rewrite(m: re.Match) -> str:
        target = m["target"]
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I) or target.startswith("/"):
            return m[0]  # a URL (http:, mailto:) or an absolute path: not ours
        path = (page_dir / target).resolve()
        if path.is_relative_to(docs) or not path.is_relative_to(ROOT) or not path.exists():
            return m[0]  # inside the site, or broken (then --strict reports it)
        rel = path.relative_to(ROOT).as_posix()
        here = posixpath.dirname(page.file.src_uri) or "."
        if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file():
            if files.get_file_from_path(rel) is None:
                files.append(File(rel, str(ROOT), config["site_dir"], config["use_directory_urls"]))
            return f"{m['bang']}[{m['text']}]({posixpath.relpath(rel, here)}{m['anchor'] or ''})"
        if m["bang"]:
            return m[0]
        if config.get("repo_url"):
            return f"[{m['text']}]({config['repo_url'].rstrip('/')}/blob/HEAD/{rel}{m['anchor'] or ''})"
        return m["text"]

    # leave fenced code blocks as they are
    out, last = [], 0
    for fence in FENCE.finditer(markdown):
        out += [LINK.sub(rewrite, markdown[last:fence.start()]), fence[0]]
        last = fence.end()
    out.append(LINK.sub(rewrite, markdown[last:]))
    return "".join(out)
