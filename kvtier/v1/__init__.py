"""Generated protobuf and gRPC stubs of proto/kvtier/v1/kvtier.proto (scripts/gen_proto.py)."""
