//! Integration tests of the orchestrator, through its public gRPC API.
