"""intro2llm.loss."""
