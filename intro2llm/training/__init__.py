"""intro2llm.training."""
