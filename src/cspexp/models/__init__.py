"""Models: LisaModel (transformers parts + LISA glue), tokenizers, prompts, builders and loaders."""
