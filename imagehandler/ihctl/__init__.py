"""ihctl, the operator CLI of the image handler (console script ``ihctl``).

Modules: :mod:`.args` (the command line and the requests built from it), :mod:`.commands`
(one handler call per command), :mod:`.render` (tables, views, JSON; pure functions),
:mod:`.names` (enum values <-> CLI words, from the protobuf descriptors).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

import grpc

from imagehandler.channel import open_channel
from imagehandler.ihctl import commands, render
from imagehandler.ihctl.args import build_parser
from imagehandler.rpc import read_rpc_error

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 141


def main(argv: Sequence[str] | None = None) -> int:
    """Run ihctl; returns the exit code (see ``ihctl --help``)."""
    args = build_parser(os.environ).parse_args(argv)
    output = commands.Output(out=sys.stdout, err=sys.stderr, json=args.json)
    try:
        channel = open_channel(
            args.handler,
            tls=args.tls,
            tls_ca=args.tls_ca,
            tls_cert=args.tls_cert,
            tls_key=args.tls_key,
            token=args.token,
        )
    except ValueError as err:
        output.note(f"ihctl: {err}")
        return EXIT_USAGE
    try:
        with channel:
            client = commands.Client.over(channel, args.handler, args.timeout)
            return commands.run(args, client, output)
    except grpc.RpcError as err:
        output.note(render.remote_error_text(read_rpc_error(err), args.handler))
        return EXIT_FAILED
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader went away (ihctl watch | head): stop quietly, like other tools do.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
