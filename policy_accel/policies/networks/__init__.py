"""Plain-torch networks with the original checkpoints' state-dict key names."""
