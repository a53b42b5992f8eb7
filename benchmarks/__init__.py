"""Parity and speed benchmarks for exported models."""
