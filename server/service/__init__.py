"""The application layer: owns the event loop's work, calls the job repository, and knows
nothing of gRPC. The transport talks to it through :class:`server.service.handler.Handler`."""
