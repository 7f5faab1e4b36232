"""The job policy's rules on their own (imagehandler.jobpolicy): patterns, address classes, URL
tricks, roots and grants. The end-to-end refusals are in tests/test_job_policy_e2e.py."""

from __future__ import annotations

import ipaddress

import pytest

from imagehandler.jobpolicy import ANONYMOUS, EgressPolicy, Grants, JobPolicy, Refused, Roots
from imagehandler.jobpolicy.addresses import address_class, literal_address
from imagehandler.jobpolicy.grants import Submitter, parse_grants
from imagehandler.jobpolicy.patterns import HostPattern, UrlPattern, parse_url


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("127.0.0.1", "loopback"),
        ("::1", "loopback"),
        ("169.254.169.254", "link-local"),  # AWS, GCP, Azure metadata
        ("fe80::1", "link-local"),
        ("fd00:ec2::254", "private"),  # AWS metadata over IPv6
        ("10.96.0.1", "private"),
        ("172.17.0.2", "private"),
        ("192.168.1.1", "private"),
        ("100.64.0.1", "shared"),
        ("0.0.0.0", "unspecified"),
        ("224.0.0.251", "multicast"),
        ("::ffff:127.0.0.1", "loopback"),
        ("::ffff:169.254.169.254", "link-local"),
        ("64:ff9b::a9fe:a9fe", "link-local"),  # NAT64 of 169.254.169.254
        ("2002:7f00:1::", "loopback"),  # 6to4 of 127.0.0.1
        ("8.8.8.8", None),
        ("2606:4700:4700::1111", None),
        ("::ffff:8.8.8.8", None),
    ],
)
def test_address_classes(address: str, expected: str | None) -> None:
    assert address_class(ipaddress.ip_address(address)) == expected


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("127.0.0.1", "127.0.0.1"),
        ("127.1", "127.0.0.1"),
        ("2130706433", "127.0.0.1"),
        ("0x7f.1", "127.0.0.1"),
        ("0177.0.0.1", "127.0.0.1"),
        ("[::1]", "::1"),
        ("registry.example.com", None),
        ("1e100.net", None),
    ],
)
def test_addresses_in_every_spelling_are_addresses(host: str, expected: str | None) -> None:
    found = literal_address(host)
    assert (str(found) if found else None) == expected


def test_registry_patterns() -> None:
    policy = EgressPolicy.parse(registries="ghcr.io,*.example.com,reg.internal:*,[::1]:5000")
    for good in ("ghcr.io", "GHCR.io", "a.example.com", "a.b.example.com", "reg.internal:5000"):
        policy.check_registry(good)
    for bad, rule in [
        ("ghcr.io:22", "allowed-registries"),  # a port the pattern does not give
        ("example.com", "allowed-registries"),
        ("evil.com", "allowed-registries"),
        ("[::1]:5000", "loopback"),  # allowed by name, refused by address
    ]:
        with pytest.raises(Refused) as refused:
            policy.check_registry(bad)
        assert refused.value.rule == rule, refused.value


def test_the_default_takes_any_public_registry_but_no_internal_address() -> None:
    policy = EgressPolicy()
    policy.check_registry("")  # docker.io
    policy.check_registry("quay.io")
    for bad, rule in [
        ("127.0.0.1", "loopback"),
        ("localhost", "loopback"),
        ("169.254.169.254", "link-local"),
        ("10.0.0.5", "private"),
        ("2130706433", "loopback"),
        ("quay.io:8443", "allowed-registries"),
    ]:
        with pytest.raises(Refused) as refused:
            policy.check_registry(bad)
        assert refused.value.rule == rule
        assert "--allowed-" in refused.value.message


def test_allowed_networks_open_exactly_their_addresses() -> None:
    policy = EgressPolicy.parse(registries="*:*", networks="127.0.0.1/32,10.20.0.0/16")
    policy.check_registry("127.0.0.1:5000")
    policy.check_registry("10.20.3.4:5000")
    with pytest.raises(Refused, match="private"):
        policy.check_registry("10.21.0.1:5000")
    with pytest.raises(Refused, match="loopback"):
        policy.check_registry("127.0.0.2:5000")


def test_the_handler_itself_is_refused_even_where_its_network_is_allowed() -> None:
    policy = EgressPolicy.parse(registries="*:*", networks="127.0.0.0/8").with_own_endpoints(
        [("127.0.0.1", 50051), ("handler.ns.svc", 50051)]
    )
    policy.check_registry("127.0.0.1:5000")
    for bad in ("127.0.0.1:50051", "handler.ns.svc:50051"):
        with pytest.raises(Refused) as refused:
            policy.check_registry(bad)
        assert refused.value.rule == "handler"
    unspecified = EgressPolicy.parse(registries="*:*", networks="127.0.0.0/8").with_own_endpoints(
        [("0.0.0.0", 50051)]
    )
    with pytest.raises(Refused, match="handler"):
        unspecified.check_registry("localhost:50051")


@pytest.mark.parametrize(
    ("url", "matches"),
    [
        ("https://artifacts.example.com/builds/1.tar", True),
        ("https://artifacts.example.com:443/builds/1.tar", True),
        ("https://artifacts.example.com/builds", True),
        ("https://artifacts.example.com/builds-old/1.tar", False),
        ("https://artifacts.example.com:8443/builds/1.tar", False),
        ("http://artifacts.example.com/builds/1.tar", False),
        ("https://artifacts.example.com.evil.com/builds/1.tar", False),
        ("https://evil.com/artifacts.example.com/builds/1.tar", False),
    ],
)
def test_url_prefixes(url: str, matches: bool) -> None:
    pattern = UrlPattern.parse("https://artifacts.example.com/builds")
    assert pattern.matches(parse_url(url, "artifact.url")) is matches


@pytest.mark.parametrize(
    "url",
    [
        "https://artifacts.example.com@127.0.0.1/builds/x",  # user information
        "https://artifacts.example.com/builds/../admin",
        "https://artifacts.example.com/builds/%2e%2e/admin",
        "https://artifacts.example.com\\@127.0.0.1/builds/x",
        "https://artifacts.example.com/builds/ x",
        "https://artifacts.exämple.com/builds/x",
    ],
)
def test_url_tricks_are_refused(url: str) -> None:
    policy = EgressPolicy.parse(artifact_urls="https://artifacts.example.com/builds/")
    with pytest.raises(Refused) as refused:
        policy.check_artifact_url(url)
    assert refused.value.rule == "url"


def test_artifact_urls_need_an_allowed_prefix_and_oci_an_allowed_registry() -> None:
    policy = EgressPolicy.parse(
        registries="ghcr.io", artifact_urls="https://artifacts.example.com/"
    )
    policy.check_artifact_url("https://artifacts.example.com/x.tar")
    policy.check_artifact_url("oci://ghcr.io/org/app:1")
    with pytest.raises(Refused, match="allowed-artifact-urls"):
        policy.check_artifact_url("https://other.example.com/x.tar")
    with pytest.raises(Refused, match="allowed-registries"):
        policy.check_artifact_url("oci://quay.io/org/app:1")
    with pytest.raises(Refused, match="allowed-artifact-urls"):
        EgressPolicy().check_artifact_url("https://artifacts.example.com/x.tar")  # default: none


def test_token_realms_stay_on_the_registry_or_an_allowed_host() -> None:
    policy = EgressPolicy.parse(registries="registry.example.com,auth.example.com")
    policy.check_realm("https://registry.example.com/token", "registry.example.com", "")
    policy.check_realm("https://auth.example.com/jwt", "registry.example.com", "")
    EgressPolicy.parse(registries="docker.io").check_realm(
        "https://auth.docker.io/token", "docker.io", "registry-1.docker.io"
    )
    with pytest.raises(Refused) as refused:
        policy.check_realm("https://elsewhere.example.org/token", "registry.example.com", "")
    assert refused.value.rule == "token-realm"
    with pytest.raises(Refused, match="link-local"):
        EgressPolicy().check_realm("http://169.254.169.254/latest", "registry.example.com", "")


def test_roots() -> None:
    roots = Roots.parse("--artifact-roots", "/srv/artifacts/,/builds")
    assert roots.check("/srv/artifacts/a/b.tar", "artifact.path") == "/srv/artifacts/a/b.tar"
    assert roots.check("/builds", "artifact.path") == "/builds"
    for bad in ("/srv/artifacts-old/x", "/etc/passwd", "relative/x", "/srv/artifacts/../x"):
        with pytest.raises(Refused) as refused:
            roots.check(bad, "artifact.path")
        assert refused.value.rule == "artifact-roots"
    with pytest.raises(Refused, match="no --node-roots are configured"):
        Roots.parse("--node-roots", "").check("/host", "node.root_path")
    with pytest.raises(Refused, match="symbolic link"):
        roots.check_resolved("/builds/link", "/etc/passwd", ["/builds"], "artifact.path")
    with pytest.raises(ValueError, match="absolute"):
        Roots.parse("--node-roots", "host")


def test_grants() -> None:
    grants = Grants(
        parse_grants(
            {
                "team-a": {"registries": ["ghcr.io"], "allowed": ["ci-a", "role:admin"]},
                "public": {"registries": ["*"], "allowed": ["*"]},
            },
            "grants.json",
        )
    )
    ci_a = Submitter("ci-a", frozenset({"submit"}))
    ci_b = Submitter("ci-b", frozenset({"submit"}))
    ops = Submitter("ops", frozenset({"admin"}))
    grants.check("team-a", "ghcr.io", ci_a, "image.credentials_ref")
    grants.check("team-a", "ghcr.io", ops, "image.credentials_ref")
    grants.check("public", "quay.io", ANONYMOUS, "image.credentials_ref")
    with pytest.raises(Refused, match="not granted to token 'ci-b'"):
        grants.check("team-a", "ghcr.io", ci_b, "image.credentials_ref")
    # An unknown ref reads the same as one the caller may not use.
    with pytest.raises(Refused, match="not granted to token 'ci-b'"):
        grants.check("nope", "ghcr.io", ci_b, "image.credentials_ref")
    with pytest.raises(Refused, match=r"not for registry 'quay\.io'"):
        grants.check("team-a", "quay.io", ci_a, "image.credentials_ref")
    with pytest.raises(ValueError, match="needs 'registries'"):
        parse_grants({"x": {"allowed": ["*"]}}, "grants.json")
    with pytest.raises(ValueError, match="needs 'allowed'"):
        parse_grants({"x": {"registries": ["ghcr.io"], "allowed": []}}, "grants.json")


def test_a_job_policy_checks_every_field_a_job_aims_with() -> None:
    policy = JobPolicy()
    with pytest.raises(Refused, match="node-roots"):
        policy.check_node("/host")
    with pytest.raises(Refused, match="artifact-roots"):
        policy.check_artifact("/etc", "")
    with pytest.raises(Refused, match="loopback"):
        policy.check_image("ghcr.io", "", "http://127.0.0.1:3128", ANONYMOUS)
    with pytest.raises(Refused, match="credential-grants"):
        policy.check_image("ghcr.io", "team-a", "", ANONYMOUS)


def test_bad_patterns_name_their_flag() -> None:
    with pytest.raises(ValueError, match="--allowed-registries"):
        EgressPolicy.parse(registries="http://ghcr.io")
    with pytest.raises(ValueError, match="--allowed-artifact-urls"):
        EgressPolicy.parse(artifact_urls="artifacts.example.com")
    with pytest.raises(ValueError, match="--allowed-networks"):
        EgressPolicy.parse(networks="10.0.0.0/33")
    assert HostPattern.parse("*").matches("anything.example", "")
