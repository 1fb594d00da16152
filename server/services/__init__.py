"""gRPC servicers: check permission, validate, call the store, map the result to protobuf."""
