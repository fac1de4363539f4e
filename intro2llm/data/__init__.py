"""intro2llm.data."""
