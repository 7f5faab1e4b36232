"""Feeds for the vulnerability database tests, in the forms their publishers use.

The packaged feeds (``vulndata/``) have no Debian data, so the Debian path is exercised with
a small feed in osv.dev's ``Debian/all.zip`` form whose records are transcribed from Debian's
security tracker (the fixed versions are those of the named DSAs):

- CVE-2023-4911 (glibc, "Looney Tunables"): bookworm fixed in 2.36-9+deb12u3 (DSA-5514-1);
- CVE-2024-6387 (openssh, "regreSSHion"): bookworm fixed in 1:9.2p1-2+deb12u3 (DSA-5724-1);
- CVE-2023-38545 (curl, SOCKS5 heap overflow): bookworm fixed in 7.88.1-10+deb12u4
  (DSA-5525-1).
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
VULNDATA = ROOT / "vulndata"
PYPA = VULNDATA / "pypa-advisory-database-3ccb612.tar.gz"
ALPINE = VULNDATA / "alpine-secdb-06f6e96.tar.gz"
NODEJS = VULNDATA / "nodejs-security-wg-npm-f1288d0.tar.gz"

DEBIAN_FIXES = [
    ("CVE-2023-4911", "glibc", "2.36-9+deb12u3", "DSA-5514-1"),
    ("CVE-2024-6387", "openssh", "1:9.2p1-2+deb12u3", "DSA-5724-1"),
    ("CVE-2023-38545", "curl", "7.88.1-10+deb12u4", "DSA-5525-1"),
]


def debian_record(cve: str, source: str, fixed: str, dsa: str) -> dict[str, Any]:
    return {
        "schema_version": "1.6.0",
        "id": f"DEBIAN-{cve}",
        "modified": "2024-07-10T00:00:00Z",
        "upstream": [cve],
        "related": [dsa],
        "details": f"{cve} in {source}, fixed in bookworm by {dsa}.",
        "affected": [
            {
                "package": {
                    "ecosystem": "Debian:12",
                    "name": source,
                    "purl": f"pkg:deb/debian/{source}?arch=source",
                },
                "ranges": [
                    {"type": "ECOSYSTEM", "events": [{"introduced": "0"}, {"fixed": fixed}]}
                ],
            }
        ],
    }


def debian_zip(path: Path, records: list[dict[str, Any]] | None = None) -> Path:
    """``Debian/all.zip`` as osv.dev publishes it: one JSON file per record."""
    path.parent.mkdir(parents=True, exist_ok=True)
    chosen = records if records is not None else [debian_record(*fix) for fix in DEBIAN_FIXES]
    with zipfile.ZipFile(path, "w") as archive:
        for record in chosen:
            info = zipfile.ZipInfo(f"{record['id']}.json", date_time=(2024, 7, 10, 12, 0, 0))
            archive.writestr(info, json.dumps(record, indent=1))
    return path


# A Debian 12 dpkg database: glibc affected by CVE-2023-4911, openssh at exactly its fix (with
# an epoch), curl affected (deb12u3 < deb12u4), and a removed package that is not installed.
DPKG_STATUS = """\
Package: libc6
Status: install ok installed
Architecture: amd64
Source: glibc
Version: 2.36-9+deb12u1

Package: openssh-client
Status: install ok installed
Architecture: amd64
Source: openssh
Version: 1:9.2p1-2+deb12u3
Description: secure shell (SSH) client
 A multi-line description
 that goes on.

Package: curl
Status: install ok installed
Architecture: amd64
Version: 7.88.1-10+deb12u3

Package: libssl1.1
Status: deinstall ok config-files
Architecture: amd64
Source: openssl
Version: 1.1.1n-0+deb11u1
"""


def debian_database(work: Path) -> Path:
    """A databases directory updated with a Debian feed (osv.dev's form) and the packaged
    feeds, as `image-scanner db update` makes it."""
    from scanner_client.vulndb import update

    origins = [str(debian_zip(work / "Debian" / "all.zip")), str(PYPA), str(ALPINE), str(NODEJS)]
    update.update(work / "db", origins)
    return work / "db"
