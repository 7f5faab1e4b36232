"""The builtin scanning engine (``image-scanner --engine builtin``).

Modules: :mod:`.registry` (Registry HTTP API v2 pulls), :mod:`.images` (OCI layouts and
archives), :mod:`.layers` (layers streamed into an index of the image), :mod:`.rootfs`
(directories read in place), :mod:`.files` (one file's facts), :mod:`.catalog` (what a root
contains), :mod:`.analyzers` (dpkg, apk, Python, npm), :mod:`.rpm`, :mod:`.gobinary`,
:mod:`.java`, :mod:`.sbom` (CycloneDX), :mod:`.vulns` (OSV matching with univers),
:mod:`.malware` and :mod:`.secrets` (YARA rules), :mod:`.databases` (loading and validating
the databases).
"""

from scanner_client.engines.builtin.engine import BuiltinEngine, BuiltinSettings

__all__ = ["BuiltinEngine", "BuiltinSettings"]
