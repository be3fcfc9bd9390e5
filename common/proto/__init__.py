"""Generated protobuf modules (python -m common.gen_proto)."""
