"""intro2llm.tokenizer."""
