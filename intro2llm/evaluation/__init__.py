"""intro2llm.evaluation."""
