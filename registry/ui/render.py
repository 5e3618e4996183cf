"""The UI's Jinja2 templates, loaded on first use: a server that never serves a page never
imports jinja2. aiohttp_jinja2 finds them under TEMPLATES (its `app_key`)."""

from __future__ import annotations

from pathlib import Path

from aiohttp import web

from ..store_commands import human
from .summaries import platform_text

DIRECTORY = Path(__file__).parent / "templates"


class LazyTemplates:
    """Stands in for a jinja2.Environment where aiohttp_jinja2 looks for one (it only asks
    for templates); the environment is made on the first `get_template`."""

    def __init__(self, directory: Path = DIRECTORY):
        self.directory = directory
        self._env = None

    @property
    def env(self):
        if self._env is None:
            import jinja2

            env = jinja2.Environment(loader=jinja2.FileSystemLoader(self.directory), autoescape=True,
                                     trim_blocks=True, lstrip_blocks=True, auto_reload=False,
                                     undefined=jinja2.StrictUndefined)
            env.filters["size"] = human_size
            env.filters["platform"] = platform_text
            self._env = env
        return self._env

    def get_template(self, name: str):
        return self.env.get_template(name)


TEMPLATES = web.AppKey("ui_templates", LazyTemplates)


def human_size(size: object) -> str:
    """Bytes as `kura du` prints them (binary units)."""
    return human(size) if isinstance(size, int) else "—"
