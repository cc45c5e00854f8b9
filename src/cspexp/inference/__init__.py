"""Inference on single images outside an evaluation: what `python -m cspexp.predict` and
`python -m cspexp.demo` share — the inputs (`inputs.py`), one pass of a method over an image and a
query with its mask, kept tokens, FLOPs and latency (`infer.py`), and the files predict writes for it
(`record.py`)."""
