"""``image-scanner db``: the builtin engine's databases from the command line.

- ``db info [--db-dir DIR | --file FILE] [--json]``: what is loaded, each source's origin,
  snapshot date and age, record count, checksum and licence;
- ``db verify [--db-dir DIR | --file FILE]``: SQLite's integrity check, the content checksum,
  the manifest's counts (exit 1 with the reasons when it fails);
- ``db build --from SRC [--from SRC ...] --out FILE``: compile feeds into a new database;
- ``db update --from SRC [--from SRC ...] [--db-dir DIR]``: build, verify and swap in; a
  running scanner takes it into use before its next job. A failure leaves the database as it
  was and exits 1 saying why.

``SRC`` is a file, a directory, a zip or tar archive of OSV / Alpine secdb / Node.js WG
records, or an http(s) URL of one (fetched through ``--proxy-url``).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping, Sequence
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Final

from scanner_client.db import DatabaseError
from scanner_client.vulndb.build import BuildReport

ENV_PREFIX: Final = "IMAGE_SCANNER_"
# Shown for each skipped record up to this many; the rest are counted.
SHOWN_PROBLEMS: Final = 20
# Sources older than this get the advice to update.
STALE_DAYS: Final = 7


def _parser(env: Mapping[str, str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="image-scanner db",
        description="The builtin engine's scan databases: show, verify, build, update.",
    )
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    db_dir = env.get(ENV_PREFIX + "DB_DIR", "")
    proxy = env.get(ENV_PREFIX + "PROXY_URL", "")

    def where(sub: argparse.ArgumentParser) -> None:
        group = sub.add_mutually_exclusive_group()
        group.add_argument(
            "--db-dir",
            default=db_dir,
            help=f"databases directory (default: packaged; env {ENV_PREFIX}DB_DIR)",
        )
        group.add_argument("--file", default="", help="a vulnerability database file")

    def sources(sub: argparse.ArgumentParser) -> None:
        sub.add_argument(
            "--from",
            dest="origins",
            action="append",
            required=True,
            metavar="PATH_OR_URL",
            help="a feed: file, directory, zip or tar archive, or http(s) URL (repeatable)",
        )
        sub.add_argument(
            "--snapshot-date",
            default="",
            metavar="DATE",
            help="the date the feeds were taken, when they do not say (RFC 3339)",
        )
        sub.add_argument(
            "--proxy-url",
            default=proxy,
            metavar="URL",
            help=f"proxy for http(s) sources (env {ENV_PREFIX}PROXY_URL)",
        )

    info = actions.add_parser("info", help="show the databases, their sources and ages")
    where(info)
    info.add_argument("--json", action="store_true", help="print JSON")
    verify = actions.add_parser("verify", help="check a database thoroughly")
    where(verify)
    build = actions.add_parser("build", help="compile feeds into a new database file")
    sources(build)
    build.add_argument("--out", required=True, metavar="FILE", help="the database file to write")
    update = actions.add_parser("update", help="build, verify and swap in a new database")
    sources(update)
    update.add_argument(
        "--db-dir",
        default=db_dir,
        required=not db_dir,
        help=f"the scanner's databases directory, seeded when empty (env {ENV_PREFIX}DB_DIR)",
    )
    return parser


def main(argv: Sequence[str], env: Mapping[str, str]) -> int:
    args = _parser(env).parse_args(list(argv))
    try:
        if args.action == "info":
            return _info(args)
        if args.action == "verify":
            return _verify(args)
        if args.action == "build":
            return _build(args)
        return _update(args)
    except DatabaseError as exc:
        what = {"update": "db update failed", "build": "db build failed"}.get(
            args.action, "invalid database"
        )
        print(f"image-scanner: {what}: {exc}", file=sys.stderr)
        if args.action == "update":
            _print_kept(Path(args.db_dir))
        return 1


def _print_kept(directory: Path) -> None:
    from scanner_client.db import read_manifest
    from scanner_client.vulndb.store import VulnStore

    try:
        path = read_manifest(directory)["vulnerabilities"].path
        store = VulnStore(path)
    except DatabaseError:
        return
    print(
        f"image-scanner: {path} is unchanged (version {store.version}, "
        f"released {store.released_at})",
        file=sys.stderr,
    )
    store.close()


def days_old(snapshot: str, today: date | None = None) -> int:
    return ((today or datetime.now(UTC).date()) - date.fromisoformat(snapshot[:10])).days


def age(snapshot: str, today: date | None = None) -> str:
    """``2 years old``, ``35 days old``, ``today``."""
    days = days_old(snapshot, today)
    if days <= 0:
        return "today"
    if days < 60:
        return f"{days} day{'s' if days != 1 else ''} old"
    if days < 730:
        return f"{days // 30} months old"
    return f"{days // 365} years old"


def _info(args: argparse.Namespace) -> int:
    from scanner_client.engines.builtin.databases import load_databases
    from scanner_client.vulndb.store import VulnStore

    if args.file:
        store = VulnStore(Path(args.file))
        rows: list[dict[str, object]] = [
            {
                "name": "vulnerabilities",
                "version": store.version,
                "released_at": store.released_at,
                "path": str(store.path),
                "entries": f"{store.count('advisories')} advisories",
                "sources": [vars(s) for s in store.sources],
            }
        ]
    else:
        rows = load_databases(Path(args.db_dir) if args.db_dir else None).describe()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    stale = False
    for row in rows:
        print(
            f"{row['name']:<16} version {row['version']:<20} released {row['released_at']:<21} "
            f"{row['entries']:<18} {row['path']}"
        )
        for source in row.get("sources") or []:  # type: ignore[attr-defined]
            snapshot = str(source["snapshot_date"])
            stale = stale or days_old(snapshot) > STALE_DAYS
            print(
                f"  source {source['name']}: {source['format']}, snapshot {snapshot} "
                f"({age(snapshot)}), {source['records']} records, "
                f"{source['problems']} skipped as malformed, "
                f"licence: {source['licence'] or 'not stated'}"
            )
            print(f"         from {source['origin']} (sha256 {str(source['sha256'])[:16]}…)")
    if stale:
        print(
            "Some sources are old: production scanners should update from current feeds "
            "(image-scanner db update --from URL --db-dir DIR, or --db-update-url)."
        )
    return 0


def _verify(args: argparse.Namespace) -> int:
    from scanner_client.db import read_manifest
    from scanner_client.vulndb.store import VulnStore

    if args.file:
        path = Path(args.file)
    else:
        path = read_manifest(Path(args.db_dir) if args.db_dir else None)["vulnerabilities"].path
    store = VulnStore(path)
    try:
        problems = store.verify()
    finally:
        store.close()
    if problems:
        for problem in problems:
            print(f"image-scanner: {path}: {problem}", file=sys.stderr)
        return 1
    print(f"{path}: ok (version {store.version}, content sha256 {store.content_sha256})")
    return 0


def _print_report(report: BuildReport) -> None:
    for source in report.sources:
        info = source.info
        print(
            f"source {info.name}: {info.format}, snapshot {info.snapshot_date}, "
            f"{info.records} records, {len(source.problems)} skipped as malformed"
            + "".join(f", {n} left out ({why})" for why, n in sorted(source.left_out.items()))
        )
        for problem in source.problems[:SHOWN_PROBLEMS]:
            print(f"  skipped {problem}", file=sys.stderr)
        if len(source.problems) > SHOWN_PROBLEMS:
            print(
                f"  … and {len(source.problems) - SHOWN_PROBLEMS} more skipped records",
                file=sys.stderr,
            )
    print(
        f"{report.path}: version {report.version}, released {report.released_at}, "
        f"{report.advisories} advisories ({report.duplicates} duplicate ids kept once), "
        f"content sha256 {report.content_sha256}"
    )


def _build(args: argparse.Namespace) -> int:
    from scanner_client.vulndb.build import build

    report = build(
        args.origins, Path(args.out), proxy=args.proxy_url, snapshot_date=args.snapshot_date
    )
    _print_report(report)
    return 0


def _update(args: argparse.Namespace) -> int:
    from scanner_client.vulndb.update import update

    outcome = update(
        Path(args.db_dir), args.origins, proxy=args.proxy_url, snapshot_date=args.snapshot_date
    )
    outcome.report.path = outcome.path  # it was built beside it, under a temporary name
    _print_report(outcome.report)
    if outcome.changed:
        print(f"updated {outcome.path}: {outcome.version} (was {outcome.previous_version or '-'})")
    else:
        print(f"{outcome.path} is already up to date ({outcome.version})")
    return 0
