"""MkDocs hooks: the site's home page is README.md, read at build time (one text for both), with its
links into docs/ made relative to the site."""

from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def on_page_read_source(page, config):
    if page.file.src_uri != "index.md":
        return None
    text = README.read_text()
    return text.replace("](docs/", "](").replace("[CHANGELOG.md](CHANGELOG.md)", "`CHANGELOG.md` in the repository")
