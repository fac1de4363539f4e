"""intro2llm.model."""
