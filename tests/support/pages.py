"""Reading the web app's pages in tests: their tags, and text that must come out escaped."""

from __future__ import annotations

from html.parser import HTMLParser

HOSTILE_URL = 'http://evil.test/<script>alert("url")</script>"onmouseover="alert(1)'
HOSTILE_REASON = "<script>alert('reason')</script><img src=x onerror=alert(2)>"


class Elements(HTMLParser):
    """Every start tag of a page, with its attributes."""

    def __init__(self, html: str) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.feed(html)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))

    def all(self, tag: str) -> list[dict[str, str | None]]:
        return [attrs for name, attrs in self.tags if name == tag]
