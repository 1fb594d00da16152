"""prefd server: preferences and runtime configuration over gRPC."""

__version__ = "0.1.0"
