"""Accounting: analytic FLOPs from the token trace, fvcore breakdowns, latency and memory."""
