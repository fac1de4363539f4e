"""intro2llm.configs."""
