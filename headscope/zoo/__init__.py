"""The bundled demo model: corpus generator, tokenizer and training recipe."""
