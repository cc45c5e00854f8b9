"""Lightning modules: the evaluation loop."""
