"""Which token role may call which RPC: the one table the interceptor consults.

| role      | may call |
|-----------|----------|
| `submit`  | JobService.SubmitJob, SubmitJobs, SubmitJobStream |
| `read`    | JobService.GetJob, ListJobs, WatchJobs, GetQueueStats, GetJobResult,
|           | ListRiskAcceptances; ScannerService.ListScanners |
| `scanner` | ScannerService.Connect |
| `admin`   | everything, including CancelJob, RedeliverJob, AcceptRisk, RevokeRiskAcceptance, |
|           | RematchJobs |

A token may carry several roles. Health (``grpc.health.v1.Health``) and server reflection are
open to everybody. A method of the handler's services that is not in the table (one added later)
is ``admin`` only until it is listed here: new methods are closed by default.
"""

from __future__ import annotations

JOB_SERVICE = "imagehandler.v1.JobService"
SCANNER_SERVICE = "imagehandler.v1.ScannerService"

OPEN_SERVICES = frozenset(
    {
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
        "grpc.reflection.v1.ServerReflection",
    }
)

ADMIN = "admin"

_ROLE_METHODS: dict[str, tuple[str, ...]] = {
    "submit": (
        f"{JOB_SERVICE}/SubmitJob",
        f"{JOB_SERVICE}/SubmitJobs",
        f"{JOB_SERVICE}/SubmitJobStream",
    ),
    "read": (
        f"{JOB_SERVICE}/GetJob",
        f"{JOB_SERVICE}/ListJobs",
        f"{JOB_SERVICE}/WatchJobs",
        f"{JOB_SERVICE}/GetQueueStats",
        f"{JOB_SERVICE}/GetJobResult",
        f"{JOB_SERVICE}/ListRiskAcceptances",
        f"{SCANNER_SERVICE}/ListScanners",
    ),
    "scanner": (f"{SCANNER_SERVICE}/Connect",),
}

# "/package.Service/Method" -> the roles that may call it (admin always may).
METHOD_ROLES: dict[str, frozenset[str]] = {}
for _role, _methods in _ROLE_METHODS.items():
    for _method in _methods:
        METHOD_ROLES["/" + _method] = METHOD_ROLES.get("/" + _method, frozenset({ADMIN})) | {_role}

ADMIN_ONLY = frozenset({ADMIN})

# Submit methods: what the per-client submit rate limit counts.
SUBMIT_BATCH = f"/{JOB_SERVICE}/SubmitJobs"
SUBMIT_METHODS = frozenset({f"/{JOB_SERVICE}/SubmitJob", SUBMIT_BATCH})
# The submit stream: each of its messages counts as one job against the rate limit.
SUBMIT_STREAM = f"/{JOB_SERVICE}/SubmitJobStream"


def service_of(method: str) -> str:
    """``/pkg.Service/Method`` -> ``pkg.Service``."""
    return method[1:].split("/", 1)[0]


def is_open(method: str) -> bool:
    return service_of(method) in OPEN_SERVICES


def roles_for(method: str) -> frozenset[str]:
    """The roles that may call ``method`` (a closed method: admin only)."""
    return METHOD_ROLES.get(method, ADMIN_ONLY)


def short_name(method: str) -> str:
    """``/imagehandler.v1.JobService/GetJob`` -> ``JobService/GetJob``."""
    service, _, name = method[1:].partition("/")
    return f"{service.rsplit('.', 1)[-1]}/{name}"


__all__ = [
    "ADMIN",
    "METHOD_ROLES",
    "OPEN_SERVICES",
    "SUBMIT_BATCH",
    "SUBMIT_METHODS",
    "SUBMIT_STREAM",
    "is_open",
    "roles_for",
    "service_of",
    "short_name",
]
