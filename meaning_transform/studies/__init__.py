"""The compute behind each command: train, measure, return a plain JSON-ready dict."""
