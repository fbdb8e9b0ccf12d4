"""Real deployment over gRPC: the server and client, update validation, compression and secure aggregation."""
