"""spdy_hf with the rest of the Hugging Face stack: `Trainer` callbacks (gradual pruning, held zeros) and the Hub
(model card, upload)."""
