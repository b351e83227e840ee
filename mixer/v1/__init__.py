"""Generated protobuf and gRPC code for mixer.v1 (regenerate with `python -m mixer.protogen`)."""
