"""The builtin scanning engine (``image-scanner --engine builtin``).

Modules: :mod:`.registry` (Registry HTTP API v2 pulls), :mod:`.images` (OCI layouts and
archives), :mod:`.layers` (safe unpacking), :mod:`.analyzers` (dpkg, apk, Python, npm),
:mod:`.sbom` (CycloneDX), :mod:`.vulns` (OSV matching with univers), :mod:`.malware` and
:mod:`.secrets` (YARA rules), :mod:`.databases` (loading and validating the databases).
"""

from scanner_client.engines.builtin.engine import BuiltinEngine, BuiltinSettings

__all__ = ["BuiltinEngine", "BuiltinSettings"]
