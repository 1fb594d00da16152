"""The gRPC edge: authentication, request checks, error mapping, metrics, reflection and TLS."""
