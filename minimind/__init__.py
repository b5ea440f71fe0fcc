"""MiniMind: train a small chat LLM from scratch and run it."""
