"""Run outputs (DESIGN §8): results.json, samples.jsonl, error.json, and the summary table."""
