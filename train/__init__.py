"""Train the two-stage transfer-learning model (needs the [train] extra)."""
