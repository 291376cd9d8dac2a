"""Serving: an OpenAI-compatible HTTP server (`caft serve`) over the one forward and its KV-cache generation."""
