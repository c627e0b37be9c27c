"""The data stage: raw files -> validated conversations -> templated, tokenized, masked training examples."""
