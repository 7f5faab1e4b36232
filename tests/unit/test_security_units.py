"""Security pieces on their own: the token file, roles, limits, TLS settings, the CLIs' flags."""

from __future__ import annotations

import math
import os
from dataclasses import replace
from pathlib import Path

import grpc
import pytest

from imagehandler import channel
from imagehandler.channel import bearer_metadata
from imagehandler.errors import HandlerError
from imagehandler.ihctl.args import build_parser as ihctl_parser
from imagehandler.v1 import job_service_pb2, scanner_service_pb2
from scanner_client.cli import parse_args as scanner_args
from server.config import Config
from server.security import roles, tls
from server.security.interceptor import bearer_token
from server.security.limits import StreamCounter, SubmitRateLimiter
from server.security.tokens import (
    TokenFile,
    file_line,
    hash_token,
    parse_roles,
    parse_token_file,
)
from tests.conftest import TEST_CONFIG


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


# ----- the token file ---------------------------------------------------------------------


def test_token_file_parses_names_roles_and_hashes() -> None:
    text = f"""
    # comment
    {file_line("ci", ["submit", "read"], "s3cret")}   # trailing comment
    {file_line("ops", ["admin"], "other")}
    """
    table = parse_token_file(text)
    assert table[hash_token("s3cret")].name == "ci"
    assert table[hash_token("s3cret")].roles == {"submit", "read"}
    assert table[hash_token("other")].roles == {"admin"}
    assert hash_token("s3cret").startswith("sha256:")
    assert len(hash_token("x")) == 7 + 64


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("ci submit", "expected 'NAME ROLES sha256:HEX', got 2 fields"),
        ("ci root sha256:" + "0" * 64, "unknown role 'root'"),
        ("ci submit s3cret-in-clear", "the hash must be sha256: and 64 lowercase hex digits"),
        ("ci submit sha256:" + "A" * 64, "64 lowercase hex digits"),
        (f"a submit sha256:{'0' * 64}\nb read sha256:{'0' * 64}", "line 2: the same token hash"),
    ],
)
def test_token_file_errors_name_the_line(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_token_file(text)


def test_parse_roles() -> None:
    assert parse_roles("Submit, read") == {"submit", "read"}
    with pytest.raises(ValueError, match="no role"):
        parse_roles(" , ")


def test_token_file_is_read_again_after_a_change_at_most_every_interval(tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    path.write_text(file_line("a", ["read"], "one") + "\n")
    clock = Clock()
    tokens = TokenFile(path, reload_interval=1.0, clock=clock)
    assert tokens.lookup("one") is not None
    assert tokens.lookup("two") is None
    path.write_text(file_line("b", ["read"], "two") + "\n")
    os.utime(path, ns=(1, 1))  # a different mtime even on a coarse clock
    clock.now += 0.5
    assert tokens.lookup("two") is None  # not looked at yet
    clock.now += 0.6
    principal = tokens.lookup("two")
    assert principal is not None
    assert principal.name == "b"
    assert tokens.lookup("one") is None
    assert tokens.reloads == 1


def test_a_missing_or_broken_token_file_keeps_the_last_tokens(tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    path.write_text(file_line("a", ["read"], "one") + "\n")
    clock = Clock()
    tokens = TokenFile(path, reload_interval=0.0, clock=clock)
    path.unlink()
    assert tokens.lookup("one") is not None
    path.write_text("garbage line here too\n")
    assert tokens.lookup("one") is not None
    path.write_text(file_line("a", ["read"], "new") + "\n")
    os.utime(path, ns=(5, 5))
    assert tokens.lookup("new") is not None
    assert tokens.lookup("one") is None


def test_a_token_file_that_does_not_parse_stops_the_start(tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    path.write_text("ci submit plain-token\n")
    with pytest.raises(HandlerError) as error:
        TokenFile(path)
    assert error.value.code == "HNDL-003"
    assert "line 1" in error.value.message
    assert "plain-token" not in error.value.message


# ----- who may call what ------------------------------------------------------------------


def test_every_rpc_of_the_handler_has_its_roles() -> None:
    from imagehandler.v1 import job_service_pb2 as jobs_module

    methods = [
        f"/{service.full_name}/{method.name}"
        for module, name in ((jobs_module, "JobService"), (scanner_service_pb2, "ScannerService"))
        for service in [module.DESCRIPTOR.services_by_name[name]]
        for method in service.methods
    ]
    for method in methods:
        assert "admin" in roles.roles_for(method)
        assert not roles.is_open(method)
    assert roles.roles_for("/imagehandler.v1.JobService/SubmitJobs") == {"admin", "submit"}
    assert roles.roles_for("/imagehandler.v1.JobService/CancelJob") == {"admin"}
    assert roles.roles_for("/imagehandler.v1.ScannerService/Connect") == {"admin", "scanner"}
    assert roles.roles_for("/imagehandler.v1.JobService/NewMethod") == {"admin"}
    assert roles.is_open("/grpc.health.v1.Health/Check")
    assert roles.is_open("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo")
    assert roles.short_name("/imagehandler.v1.JobService/GetJob") == "JobService/GetJob"


@pytest.mark.parametrize(
    ("metadata", "token"),
    [
        ((("authorization", "Bearer abc"),), "abc"),
        ((("authorization", "bearer  abc "),), "abc"),
        ((("x-other", "1"), ("authorization", "Basic abc")), None),
        ((("authorization", "Bearer "),), None),
        ((), None),
        (None, None),
    ],
)
def test_bearer_token(metadata: object, token: str | None) -> None:
    assert bearer_token(metadata) == token  # type: ignore[arg-type]


def test_bearer_metadata() -> None:
    assert bearer_metadata("t") == (("authorization", "Bearer t"),)
    assert bearer_metadata("") == ()


# ----- limits -----------------------------------------------------------------------------


def test_submit_rate_limiter_refills_at_the_rate() -> None:
    clock = Clock()
    limiter = SubmitRateLimiter(rate=2.0, burst=4, clock=clock)
    assert limiter.take("a", 3) == 0.0
    assert limiter.take("a", 2) == pytest.approx(0.5)  # one job short at 2 jobs/s
    assert limiter.take("b", 4) == 0.0  # another client's bucket
    clock.now += 0.5
    assert limiter.take("a", 2) == 0.0
    assert math.isinf(limiter.take("a", 5))  # more than a burst can never pass
    clock.now += 100
    assert limiter.take("a", 4) == 0.0  # refilled to the burst, not beyond
    assert limiter.take("a", 1) > 0


def test_submit_rate_limiter_forgets_idle_clients() -> None:
    clock = Clock()
    limiter = SubmitRateLimiter(rate=1.0, burst=1, clock=clock)
    for n in range(10_000):
        limiter.take(f"c{n}", 1)
    clock.now += 5
    limiter.take("late", 1)
    assert len(limiter._buckets) == 1


def test_stream_counter() -> None:
    streams = StreamCounter(2)
    assert streams.acquire("a")
    assert streams.acquire("a")
    assert not streams.acquire("a")
    assert streams.acquire("b")
    streams.release("a")
    assert streams.open("a") == 1
    assert streams.acquire("a")
    streams.release("b")
    assert streams.open("b") == 0


# ----- TLS settings and configuration -----------------------------------------------------


@pytest.mark.parametrize(
    ("listen", "loopback"),
    [
        ("127.0.0.1:50051", True),
        ("127.1.2.3:1", True),
        ("localhost:50051", True),
        ("[::1]:50051", True),
        ("0.0.0.0:50051", False),
        ("[::]:50051", False),
        ("10.0.0.5:50051", False),
        ("handler.example.com:50051", False),
    ],
)
def test_is_loopback(listen: str, loopback: bool) -> None:
    assert tls.is_loopback(listen) is loopback


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"tls_cert": "c.pem"}, "tls_cert and tls_key go together"),
        ({"client_ca": "ca.pem"}, "client_ca (mutual TLS) needs tls_cert"),
        ({"max_send_bytes": 16 * 1024 * 1024}, "max_send_bytes (16777216) must be at least"),
        ({"max_streams_per_client": -1}, "max_streams_per_client must be 0 (none) or positive"),
        ({"submit_rate": -1.0}, "submit_rate must be 0 or positive"),
        ({"max_string_length": 10}, "max_string_length must be at least 256"),
        ({"handshake_timeout": 0.0}, "handshake_timeout must be positive"),
        ({"max_result_bytes": 10}, "max_result_bytes must be at least 1024"),
    ],
)
def test_config_refuses_security_settings_that_cannot_work(
    overrides: dict[str, object], message: str
) -> None:
    with pytest.raises(HandlerError) as error:
        replace(TEST_CONFIG, **overrides).check()  # type: ignore[arg-type]
    assert error.value.code == "HNDL-003"
    assert message in error.value.message


def test_server_credentials_name_the_flag_of_a_bad_file(tmp_path: Path) -> None:
    assert tls.server_credentials("", "", "") is None
    not_pem = tmp_path / "cert.pem"
    not_pem.write_text("hello")
    with pytest.raises(HandlerError, match=r"--tls-cert .* does not hold a PEM certificate"):
        tls.server_credentials(str(not_pem), str(not_pem), "")
    with pytest.raises(HandlerError, match=r"cannot read --tls-cert .*missing"):
        tls.server_credentials(str(tmp_path / "missing"), str(not_pem), "")
    with pytest.raises(ValueError, match="--tls-cert and --tls-key go together"):
        channel.channel_credentials(cert="c.pem")
    assert isinstance(channel.channel_credentials(), grpc.ChannelCredentials)


def test_config_defaults_keep_the_old_behaviour() -> None:
    config = Config()
    assert (config.tls_cert, config.client_ca, config.token_file) == ("", "", "")
    assert config.max_receive_bytes == 16 * 1024 * 1024
    assert config.submit_rate == 0.0
    config.check()


# ----- client flags -----------------------------------------------------------------------


def test_scanner_flags_and_token_file(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("s3cret-token\n")
    settings = scanner_args(
        ["--tls-ca", "ca.pem", "--tls-cert", "c.pem", "--tls-key", "k.pem"],
        env={"IMAGE_SCANNER_TOKEN_FILE": str(token)},
    )
    assert (settings.tls_ca, settings.tls_cert, settings.tls_key) == ("ca.pem", "c.pem", "k.pem")
    assert settings.token == "s3cret-token"
    assert "s3cret" not in repr(settings)
    assert scanner_args([], env={"IMAGE_SCANNER_TOKEN": "t"}).token == "t"
    assert scanner_args([], env={}).tls is False


def test_ihctl_token_and_tls_flags() -> None:
    parser = ihctl_parser({"IHCTL_TOKEN": "from-env", "IHCTL_TLS_CA": "ca.pem"})
    args = parser.parse_args(["stats"])
    assert (args.token, args.tls_ca, args.tls) == ("from-env", "ca.pem", False)
    args = parser.parse_args(["--token", "flag", "--tls", "stats"])
    assert (args.token, args.tls) == ("flag", True)


def test_unused_request_types_exist() -> None:
    # The interceptor counts SubmitJobs by its jobs field.
    assert "jobs" in job_service_pb2.SubmitJobsRequest.DESCRIPTOR.fields_by_name
