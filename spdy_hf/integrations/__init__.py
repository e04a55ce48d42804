"""Integrations with the Hugging Face stack: `transformers.Trainer` (gradual pruning) and the Hub."""
