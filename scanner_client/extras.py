"""The optional part of the scanner: the builtin engine's dependencies come with the
``builtin-engine`` extra (``pip install 'image-handler[builtin-engine]'``), so a scanner with
the noop or command engine, or a program that embeds the library, installs none of them.
Where they are needed and missing, :class:`MissingExtra` names the extra to install.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

BUILTIN_ENGINE = "builtin-engine"

# The top-level modules that the builtin-engine extra of pyproject.toml installs.
BUILTIN_ENGINE_MODULES = frozenset(
    {"yara", "univers", "packageurl", "zstandard", "httpx", "yaml", "cvss", "cryptography"}
)


class MissingExtra(ValueError):
    """A feature whose extra is not installed (a ValueError: a setting the scanner cannot
    work with, which the CLI prints before exiting 2)."""

    def __init__(self, what: str, extra: str, module: str) -> None:
        self.extra = extra
        self.module = module
        super().__init__(
            f"{what} needs the {extra} extra, which is not installed (no module {module!r}): "
            f"pip install 'image-handler[{extra}]'"
        )


@contextmanager
def builtin_engine_extra(what: str) -> Iterator[None]:
    """Turn the import of a missing builtin-engine dependency inside the block into
    :class:`MissingExtra` naming ``what`` needs it; any other missing module stays an error."""
    try:
        yield
    except ModuleNotFoundError as exc:
        top = (exc.name or "").partition(".")[0]
        if top not in BUILTIN_ENGINE_MODULES:
            raise
        raise MissingExtra(what, BUILTIN_ENGINE, top) from exc


__all__ = ["BUILTIN_ENGINE", "BUILTIN_ENGINE_MODULES", "MissingExtra", "builtin_engine_extra"]
