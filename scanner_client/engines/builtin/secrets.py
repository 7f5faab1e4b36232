"""Secret rules: private keys and cloud credentials, as YARA rules matched with the malware
rules in one pass over each file (namespace ``secrets``).

Each rule's meta gives the finding: ``rule_id`` (stable, for risk acceptance), ``title`` and
``severity``. The line of a finding is the line of its first match.
"""

from __future__ import annotations

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
