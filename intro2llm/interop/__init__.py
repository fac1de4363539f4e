"""intro2llm.interop."""
