"""Speculative decoding: drafters, the feature ring they read, and the prefix cache."""
