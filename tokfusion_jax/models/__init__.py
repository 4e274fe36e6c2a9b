"""Model definitions: the frozen TiTok tokenizer and the trainable fusion network."""
