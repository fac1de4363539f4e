"""intro2llm.optimizer."""
