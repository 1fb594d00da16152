"""Generated protobuf messages and gRPC stubs for prefd.v1 (regenerate with scripts/generate.py)."""
