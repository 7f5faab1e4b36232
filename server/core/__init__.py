"""The domain: jobs and their state machine, retries, verdicts. No gRPC, no protobuf, no
asyncio: everything here is tested without a network or an event loop."""
