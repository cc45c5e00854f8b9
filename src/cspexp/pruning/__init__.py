"""Pruning: the decoder loop (`engine`), the image→mask pipeline around it, and the methods."""
