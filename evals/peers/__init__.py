"""Peer libraries run on the same model and inputs, each in its own environment, through files."""
