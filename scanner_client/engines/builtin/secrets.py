"""Secret rules: private keys and cloud credentials, as YARA rules matched with the malware
rules in one pass over each file (namespace ``secrets``).

Each rule's meta gives the finding: ``rule_id`` (stable, for risk acceptance), ``title`` and
``severity``. The line of a finding is the line of its first confirmed match.

A rule's match is a finding only when it is also a secret (:func:`confirmed_offset`): secret
rules do not look inside binary files (:func:`is_binary`: ELF objects such as TLS libraries
carry the PEM markers as constants), a private key must load as a key, and a token must not be
a documentation placeholder (``AKIAIOSFODNN7EXAMPLE``, ``ghp_xxxx...``). A stock distribution
image has none of these.
"""

from __future__ import annotations

import base64
import binascii
import itertools
import re
from collections.abc import Sequence
from typing import Final

NAMESPACE: Final = "secrets"

RULES: Final = r"""
rule private_key
{
    meta:
        rule_id = "private-key"
        title = "Private key"
        severity = "HIGH"
    strings:
        $pem = /-----BEGIN ((RSA|DSA|EC|OPENSSH|ENCRYPTED|PGP) )?PRIVATE KEY( BLOCK)?-----/
    condition:
        $pem
}

rule aws_access_key_id
{
    meta:
        rule_id = "aws-access-key-id"
        title = "AWS access key ID"
        severity = "CRITICAL"
    strings:
        $id = /(^|[^0-9A-Z])(AKIA|ASIA|AGPA|AIDA|AROA|ANPA|ANVA|AIPA)[0-9A-Z]{16}([^0-9A-Z]|$)/
    condition:
        $id
}

rule aws_secret_access_key
{
    meta:
        rule_id = "aws-secret-access-key"
        title = "AWS secret access key"
        severity = "CRITICAL"
    strings:
        $key = /aws_?secret_?access_?key["']?\s*[:=]\s*["']?[A-Za-z0-9\/+]{40}/ nocase
    condition:
        $key
}

rule github_token
{
    meta:
        rule_id = "github-token"
        title = "GitHub token"
        severity = "CRITICAL"
    strings:
        $classic = /gh[pousr]_[A-Za-z0-9]{36}/
        $fine = /github_pat_[A-Za-z0-9_]{82}/
    condition:
        any of them
}

rule gcp_service_account_key
{
    meta:
        rule_id = "gcp-service-account"
        title = "Google Cloud service account key"
        severity = "CRITICAL"
    strings:
        $type = /"type"\s*:\s*"service_account"/
        $key = "\"private_key\""
    condition:
        $type and $key
}

rule slack_token
{
    meta:
        rule_id = "slack-token"
        title = "Slack token"
        severity = "HIGH"
    strings:
        $token = /xox[abposr]-[0-9A-Za-z]{10,48}-[0-9A-Za-z-]{10,48}/
    condition:
        $token
}
"""


# ---- precision: what a rule's match must also be to be reported ------------------------------

# The start of a file that is code or data for machines, not text a person wrote a secret into:
# an ELF object (the PEM markers inside TLS libraries are their parsers' constants), or any
# file with a NUL byte in its first block (compiled bytecode, archives, images, databases).
BINARY_SNIFF: Final = 8192
ELF_MAGIC: Final = b"\x7fELF"
# How far past a BEGIN marker its END marker may be (an RSA-16384 key is under 13 KiB).
MAX_KEY_BLOCK: Final = 64 * 1024
# Words that documentation and templates put in place of a credential.
PLACEHOLDER_WORDS: Final = (
    "EXAMPLE",
    "SAMPLE",
    "DUMMY",
    "PLACEHOLDER",
    "REPLACE",
    "REDACTED",
    "XXXXXX",
    "CHANGEME",
)
_PEM_BEGIN: Final = re.compile(rb"-----BEGIN ([A-Z0-9 ]{1,40})-----")
_RUN: Final = re.compile(r"(.)\1{5,}")
# Token bodies by rule: the part after the fixed prefix that must look random.
_TOKEN: Final = re.compile(r"(?:AKIA|ASIA|AGPA|AIDA|AROA|ANPA|ANVA|AIPA|gh[pousr]_|github_pat_)?")


def is_binary(head: bytes) -> bool:
    """Whether a file's first bytes (at least :data:`BINARY_SNIFF` of them when it is that
    long) are those of a binary file."""
    return head.startswith(ELF_MAGIC) or b"\x00" in head[:BINARY_SNIFF]


def is_placeholder(token: str) -> bool:
    """A token that documentation or a template uses: a placeholder word, one character
    repeated, a counting run (``123456789``, ``abcdefgh``), or too few distinct characters to
    be random."""
    body = _TOKEN.sub("", token, count=1) if token else token
    upper = body.upper()
    if any(word in upper for word in PLACEHOLDER_WORDS):
        return True
    if _RUN.search(body) or len(set(body)) < min(8, max(1, len(body) // 2)):
        return True
    return _counting(body, 8)


def _counting(text: str, length: int) -> bool:
    """A run of ``length`` characters each one above (or below) the one before."""
    up = down = 1
    for before, after in itertools.pairwise(text):
        up = up + 1 if ord(after) == ord(before) + 1 else 1
        down = down + 1 if ord(after) == ord(before) - 1 else 1
        if up >= length or down >= length:
            return True
    return False


def _token_of(rule_id: str, matched: bytes) -> str:
    text = matched.decode("latin-1")
    if rule_id == "aws-access-key-id":
        return text.strip("".join(ch for ch in text if not ch.isalnum()))
    if rule_id == "aws-secret-access-key":
        return text[-40:]
    return text


def key_block(data: bytes, offset: int) -> bytes | None:
    """The PEM block whose BEGIN marker is at ``offset``, through its END marker, with the
    escapes of a string literal undone (``\\n`` in JSON and source code) and each line's
    indentation removed; None when it has no END marker."""
    begin = _PEM_BEGIN.match(data, offset)
    if begin is None:
        return None
    end_marker = b"-----END " + begin.group(1) + b"-----"
    end = data.find(end_marker, begin.end(), begin.end() + MAX_KEY_BLOCK)
    if end < 0:
        return None
    block = data[offset : end + len(end_marker)]
    block = block.replace(b"\\r", b"").replace(b"\\n", b"\n").replace(b"\r", b"")
    return b"\n".join(line.strip() for line in block.split(b"\n")) + b"\n"


def is_private_key(block: bytes) -> bool:
    """Whether a PEM block is a private key that loads (or is encrypted, which is a real key
    too): parsed by ``cryptography``; OpenPGP and formats it cannot load are checked for their
    structure (base64 that decodes to the right kind of record)."""
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization

    if b"PGP PRIVATE KEY BLOCK" in block[:40]:
        return _is_pgp_secret_key(block)
    try:
        if b"OPENSSH PRIVATE KEY" in block[:40]:
            serialization.load_ssh_private_key(block, password=None)
        else:
            serialization.load_pem_private_key(block, password=None)
    except TypeError:
        return True  # encrypted: a real key whose password we do not have
    except UnsupportedAlgorithm:
        body = _base64_body(block)
        return body is not None and (body.startswith(b"openssh-key-v1\x00") or body[:1] == b"\x30")
    except ValueError:
        return False
    return True


def _base64_body(block: bytes) -> bytes | None:
    lines = block.strip().split(b"\n")[1:-1]
    body = b"".join(
        line for line in lines if line and b":" not in line and not line.startswith(b"=")
    )
    try:
        return base64.b64decode(body, validate=True)
    except (binascii.Error, ValueError):
        return None


def _is_pgp_secret_key(block: bytes) -> bool:
    """An ASCII-armored OpenPGP block whose first packet is a secret key (tag 5) and whose
    checksum, when present, matches (RFC 4880 sections 4.2 and 6.1)."""
    lines = block.strip().split(b"\n")[1:-1]
    while lines and b":" in lines[0]:
        lines.pop(0)  # armor headers
    checksum = next((line[1:] for line in lines if line.startswith(b"=")), None)
    body = _base64_body(b"-\n" + b"\n".join(lines) + b"\n-")
    if not body:
        return False
    first = body[0]
    if not first & 0x80:
        return False
    tag = first & 0x3F if first & 0x40 else (first >> 2) & 0x0F
    if tag != 5:
        return False
    if checksum is not None:
        try:
            expected = base64.b64decode(checksum, validate=True)
        except (binascii.Error, ValueError):
            return False
        return _crc24(body).to_bytes(3, "big") == expected
    return True


def _crc24(data: bytes) -> int:
    crc = 0xB704CE
    for byte in data:
        crc ^= byte << 16
        for _ in range(8):
            crc <<= 1
            if crc & 0x1000000:
                crc ^= 0x1864CFB
    return crc & 0xFFFFFF


def confirmed_offset(
    rule_id: str, data: bytes, instances: Sequence[tuple[int, bytes]]
) -> int | None:
    """The offset of the first match of a secret rule that is a real secret, None when none
    is: a private key must load, a token must not be a placeholder."""
    for offset, matched in instances:
        if rule_id == "private-key":
            block = key_block(data, offset)
            if block is not None and is_private_key(block):
                return offset
        elif rule_id == "gcp-service-account":
            begin = data.find(b"-----BEGIN", offset)
            block = key_block(data, begin) if begin >= 0 else None
            if block is not None and is_private_key(block):
                return offset
        elif not is_placeholder(_token_of(rule_id, matched)):
            return offset
    return None
