"""prefd client distribution: generated stubs in prefd.v1, the client library in prefd.client."""
