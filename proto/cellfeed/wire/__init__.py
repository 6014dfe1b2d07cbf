"""The wire contract both sides speak: protobuf messages and the Arrow batch codec."""
