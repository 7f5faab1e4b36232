"""The layers hold: the clients stand alone, the import contracts catch a violation, each part
installs only what it needs, and every error reason maps to a documented status.

Imports are checked in fresh interpreters (``sys.modules`` of this one holds everything).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
from importlib import metadata
from pathlib import Path

import grpc
import pytest

from imagehandler.errors import Catalogue, Reason
from imagehandler.rpc import STATUS_OF
from scanner_client.extras import BUILTIN_ENGINE_MODULES
from tests.conftest import MakeHandler
from tests.paths import ROOT

DEADLINE = 30.0
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")
# Installed by the server extra only; a scanner or ihctl must not load them. (grpc_reflection
# is not checked: grpc itself imports it whenever it is installed.)
SERVER_ONLY_MODULES = frozenset({"prometheus_client", "sortedcontainers"})
# The builtin engine's own: httpx is the server's too (webhooks), and it loads zstandard for
# content decoding when that is installed.
ENGINE_ONLY_MODULES = BUILTIN_ENGINE_MODULES - {"httpx", "zstandard"}

# Makes the builtin-engine extra's modules unimportable, as in an install without the extra.
WITHOUT_BUILTIN_EXTRA = textwrap.dedent(
    f"""
    import importlib.abc, sys
    class _NotInstalled(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.partition(".")[0] in {sorted(BUILTIN_ENGINE_MODULES)!r}:
                raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
            return None
    sys.meta_path.insert(0, _NotInstalled())
    """
)


def loaded_after(statement: str) -> set[str]:
    """The top-level modules a fresh interpreter has loaded after ``statement``."""
    code = f"{statement}\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    return {name.partition(".")[0] for name in json.loads(result.stdout)}


@pytest.mark.parametrize("module", ["scanner_client", "scanner_client.cli", "imagehandler.ihctl"])
def test_the_clients_import_nothing_of_the_server(module: str) -> None:
    # The check of the issue, word for word, in the project's interpreter.
    check = (
        f"import {module}, sys; "
        'assert not [m for m in sys.modules if m == "server" or m.startswith("server.")]'
    )
    result = subprocess.run(
        [sys.executable, "-c", check], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    loaded = loaded_after(f"import {module}")
    assert not loaded & SERVER_ONLY_MODULES
    assert not loaded & BUILTIN_ENGINE_MODULES


def test_the_handler_loads_none_of_the_builtin_engine() -> None:
    loaded = loaded_after("import server.app, server.cli")
    assert "server" in loaded
    assert not loaded & ENGINE_ONLY_MODULES
    assert "scanner_client" not in loaded


def requirements(extra: str | None) -> set[str]:
    """The distribution names the installed image-handler requires, base or for one extra."""
    names = set()
    for line in metadata.requires("image-handler") or ():
        requirement, _, marker = line.partition(";")
        wanted = f'extra == "{extra}"' in marker if extra else not marker.strip()
        if wanted:
            names.add(re.split(r"[\s\[<>=!~]", requirement.strip(), maxsplit=1)[0].lower())
    return names


def test_the_distribution_splits_its_dependencies_by_part() -> None:
    heavy = {"yara-python", "univers", "packageurl-python", "zstandard", "cvss", "pyyaml"}
    server_only = {"prometheus-client", "sortedcontainers", "grpcio-reflection"}
    base, server, engine = (requirements(x) for x in (None, "server", "builtin-engine"))
    assert {"grpcio", "protobuf", "googleapis-common-protos", "grpcio-status"} <= base
    assert not base & (heavy | server_only | {"cryptography", "httpx"})
    assert server_only <= server
    assert not server & heavy
    assert heavy <= engine
    assert not engine & server_only


async def test_a_noop_scanner_runs_without_the_builtin_engine_extra(
    make_handler: MakeHandler,
) -> None:
    handler = await make_handler()
    start = "import runpy; runpy.run_module('scanner_client.cli', run_name='__main__')"
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        WITHOUT_BUILTIN_EXTRA + start,
        "--handler",
        handler.address,
        "--engine",
        "noop",
        "--log-format",
        "json",
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert process.stderr is not None
    try:
        async with asyncio.timeout(DEADLINE):
            while True:
                line = await process.stderr.readline()
                assert line, "the noop scanner exited before it registered"
                if json.loads(line).get("event") == "registered":
                    break
        process.send_signal(signal.SIGTERM)
        async with asyncio.timeout(DEADLINE):
            assert await process.wait() == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


@pytest.mark.parametrize(
    ("arguments", "what"),
    [
        (["--engine", "builtin", "--handler", "127.0.0.1:1"], "--engine builtin"),
        (["db", "info"], "image-scanner db"),
    ],
)
def test_the_builtin_engine_without_its_extra_names_the_extra(
    arguments: list[str], what: str
) -> None:
    code = WITHOUT_BUILTIN_EXTRA + "from scanner_client.cli import main; sys.exit(main())"
    result = subprocess.run(
        [sys.executable, "-c", code, *arguments],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2, result.stderr
    assert f"image-scanner: {what} needs the builtin-engine extra" in result.stderr
    assert "pip install 'image-handler[builtin-engine]'" in result.stderr
    assert "Traceback" not in result.stderr


def copy_of_the_packages(into: Path) -> Path:
    """The three packages' sources and the contracts, for lint-imports to read there."""
    for package in ("imagehandler", "scanner_client", "server"):
        shutil.copytree(
            ROOT / package,
            into / package,
            ignore=shutil.ignore_patterns("__pycache__", "*.db", "*.json", "*.yar"),
        )
    shutil.copy(ROOT / "pyproject.toml", into / "pyproject.toml")
    return into


def lint_imports(where: Path) -> subprocess.CompletedProcess[str]:
    # lint-imports puts its working directory first on the path: it reads the copy.
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache"],
        cwd=where,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.mark.parametrize(
    ("module", "statement", "contract"),
    [
        ("scanner_client/violation.py", "import server.config", "scanner library imports nothing"),
        ("imagehandler/ihctl/violation.py", "from server import app", "imagehandler (the floor"),
        ("imagehandler/violation.py", "import scanner_client", "imagehandler (the floor"),
        ("imagehandler/errors.py", "import grpc", "error catalogue imports no grpc"),
        ("server/storage/memory.py", "import server.service.handler", "the handler's layers"),
        ("server/core/model.py", "from server import mapping", "the handler's layers"),
        ("server/core/retry.py", "import asyncio", "the core imports no gRPC"),
        (
            "server/core/state_machine.py",
            "from imagehandler.v1 import common_pb2",
            "the core imports no gRPC",
        ),
        ("server/service/jobs.py", "import grpc", "the service layer and the stores know nothing"),
    ],
)
def test_a_violating_import_fails_lint_imports(
    tmp_path: Path, module: str, statement: str, contract: str
) -> None:
    copy = copy_of_the_packages(tmp_path)
    kept = lint_imports(copy)
    assert kept.returncode == 0, kept.stdout + kept.stderr
    target = copy / module
    existing = target.read_text() if target.exists() else ""
    target.write_text(existing + f"\n{statement}  # a deliberate violation\n")
    broken = lint_imports(copy)
    assert broken.returncode == 1, broken.stdout + broken.stderr
    assert re.search(re.escape(contract) + r".*\n?.*BROKEN", broken.stdout), broken.stdout
    name = module.removesuffix(".py").replace("/", ".")
    assert f"{name} -> " in broken.stdout


def documented_statuses() -> dict[str, set[str]]:
    """The gRPC statuses the error table of the docs gives each HNDL code."""
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    table: dict[str, set[str]] = {}
    row = re.compile(r"^\| (HNDL-0\d\d) \|[^|]*\| ([A-Z_ /]+) \|", re.MULTILINE)
    for page in pages:
        for code, statuses in row.findall(page.read_text()):
            table[code] = {status.strip() for status in statuses.split("/")}
    return table


def test_every_reason_a_code_may_take_maps_to_a_documented_status() -> None:
    documented = documented_statuses()
    assert documented, "no error table found in README.md or docs/"
    for member in Catalogue:
        allowed = documented.get(member.code)
        assert allowed is not None, f"{member.code} is not in the error table"
        given = {STATUS_OF[reason].name for reason in member.entry.reasons}
        assert given == allowed, f"{member.code}: reasons give {given}, the docs say {allowed}"


def test_one_status_per_reason() -> None:
    assert set(STATUS_OF) == set(Reason)
    assert len(set(STATUS_OF.values())) == len(Reason)
    assert all(isinstance(status, grpc.StatusCode) for status in STATUS_OF.values())


# Imports each module first in a child forked from an interpreter that holds only third-party
# packages: an import cycle shows only when one of its modules is the first one imported.
IMPORT_EACH_FIRST = textwrap.dedent(
    """
    import importlib, json, os, sys
    from pathlib import Path
    # Third-party packages are loaded once, before forking (each child then costs ours only).
    for heavy in ("google.protobuf", "grpc", "structlog", "prometheus_client", "psycopg",
                  "psycopg_pool", "httpx", "sortedcontainers", "univers", "cyclonedx"):
        try:
            importlib.import_module(heavy)
        except ImportError:
            pass

    names = []
    for package in ("server", "imagehandler", "scanner_client"):
        for path in sorted(Path(package).rglob("*.py")):
            parts = list(path.with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            if parts[-1] != "__main__":
                names.append(".".join(parts))
    failed, running = [], {}
    for name in names + [None] * len(names):
        # As many children at once as there are cores; then wait for one to end.
        while running and (name is None or len(running) >= (os.cpu_count() or 1)):
            pid, status = os.wait()
            if status:
                failed.append(running[pid])
            del running[pid]
        if name is None:
            continue
        pid = os.fork()
        if pid == 0:
            try:
                importlib.import_module(name)
            except BaseException as exc:
                sys.stderr.write(f"{name}: {type(exc).__name__}: {exc}\\n")
                os._exit(1)
            os._exit(0)
        running[pid] = name
    print(json.dumps({"modules": len(names), "failed": sorted(failed)}))
    """
)


def test_every_module_can_be_the_first_one_imported() -> None:
    done = subprocess.run(
        [sys.executable, "-c", IMPORT_EACH_FIRST],
        cwd=ROOT, capture_output=True, text=True, timeout=600, check=True,
    )  # fmt: skip
    outcome = json.loads(done.stdout)
    assert outcome["modules"] > 100
    assert outcome["failed"] == [], done.stderr
