"""Run outputs (docs/outputs.md): results.json, samples.jsonl, error.json, and the summary table."""
