"""Shipped model bundles (see MODEL_CARD.md in each)."""
