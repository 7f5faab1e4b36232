"""The gRPC skin: servicers that convert protobuf to domain objects and back, and status mapping."""
