"""Bridges between a weight-sparse model and a dense one: encoders, decoders, hybrid passes."""
