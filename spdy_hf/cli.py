"""`spdy-hf`: the command line. Only this module prints."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

logger = logging.getLogger("spdy_hf.cli")

SHORTFALL_EXIT = 3  # the output was written, but the measured speedup missed the target


def _regime_arguments(p) -> None:
    """The flags that decide what is timed: backend, regime and level family."""
    from .families import family_names

    p.add_argument("--backend", choices=["cpu", "cuda"], help="Target backend (default cpu).")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"],
                   help="Regime: dtype (cpu: float32, or bfloat16 with the structured family; cuda: float16 "
                        "or bfloat16). The model is loaded and pruned in it.")
    p.add_argument("--batch-size", type=int, help="Regime: sequences per forward pass.")
    p.add_argument("--sequence-length", type=int, help="Regime: tokens per sequence (prefill).")
    p.add_argument("--regime", choices=["prefill", "decode"],
                   help="What must get faster: one forward pass over the sequences (prefill, the default) or "
                        "generating one token against a key/value cache of --context-length tokens (decode; causal "
                        "LMs).")
    p.add_argument("--context-length", type=int, help="Regime decode: tokens already in the cache (default 512).")
    p.add_argument("--logits", choices=["last", "all"],
                   help="Regime prefill of a causal LM: the last position's logits only (the default: time to the "
                        "first token, as generate computes them) or every position's (scoring text).")
    p.add_argument("--family", choices=family_names(),
                   help="Level families: heads and FFN neurons removed (structured, the default), those or the "
                        "backend's sparse levels per block (mixed), or sparse levels per layer (unstructured).")


def profile_command_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "profile",
        help="Measure the latency table only (on the target machine), to prune anywhere with --latency-table.",
        description="Measure how long every unit of MODEL takes at every level in the regime, on this machine's "
        "backend, and write the latency table as JSON. Prune elsewhere with `spdy-hf prune --latency-table FILE`.",
    )
    p.add_argument("model", nargs="?", default=None, help="Model directory or Hub id (default: bundled MiniLM).")
    p.add_argument("--output", "-o", required=True, help="Where to write the latency table (JSON).")
    p.add_argument("--overwrite", action="store_true", help="Replace an existing file.")
    p.add_argument("--recipe", help="A YAML/JSON SPDYConfig; flags given here override it.")
    _regime_arguments(p)
    p.add_argument("--trust-remote-code", action="store_true", help="Allow the model's own code (off by default).")
    p.add_argument("--no-progress", action="store_true", help="Hide progress bars.")
    p.set_defaults(func=profile_command)
    return p


def profile_command(args) -> int:
    from .errors import SPDYError
    from .latency.backend import working_dtype
    from .modeling.loading import load_model_and_tokenizer
    from .pruner import SPDYPruner

    if os.path.exists(args.output) and not args.overwrite:
        raise SPDYError(f"{args.output} exists; pass --overwrite to replace it.")
    config = _build_config(args)
    model, tokenizer = load_model_and_tokenizer(args.model, trust_remote_code=args.trust_remote_code,
                                                dtype=working_dtype(config.backend, config.regime.dtype))
    table = SPDYPruner(model, config, tokenizer=tokenizer).profile(progress=not args.no_progress)
    table.save(args.output)
    print(f"Latency table written to {args.output} ({table.backend}, regime {json.dumps(table.regime)}, dense model "
          f"{table.base_time_ms:.3f} ms; {len(table.ineligible)} shape(s) dense only)")
    return 0


def prune_command_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "prune",
        help="Prune a model to a target speedup on this machine, in your regime.",
        description="Prune MODEL (a local directory or Hub id; default: the bundled all-MiniLM-L6-v2) so that it "
        "runs TARGET times faster than dense in the regime, on the backend; write the pruned model and reports.",
    )
    p.add_argument("model", nargs="?", default=None, help="Model directory or Hub id (default: bundled MiniLM).")
    p.add_argument("--target-speedup", type=_targets,
                   help="End-to-end speedup to reach (default 1.5); several, comma-separated (1.25,1.5,2.0), prune to "
                        "each in one run that profiles once, builds one database and starts each later search from "
                        "the earlier ones' sensitivities, writing one output per target.")
    p.add_argument("--output", "-o", help="Output directory (default: ./spdy-<model>-<target>x); with several targets, "
                   "the folder that gets one such directory per target.")
    p.add_argument("--overwrite", action="store_true", help="Replace a non-empty output directory.")
    p.add_argument("--recipe", help="A YAML/JSON SPDYConfig; flags given here override it.")
    _regime_arguments(p)
    p.add_argument("--calibration", help="'builtin' (offline corpus), a data file (.txt, .json, .jsonl, .parquet, "
                   ".csv) or a Hub dataset name.")
    p.add_argument("--dataset-config", help="Configuration name of a Hub calibration dataset.")
    p.add_argument("--split", help="Split of a Hub calibration dataset (default train; slices like train[:2000]).")
    p.add_argument("--text-column", help="Column holding the calibration text (default text).")
    p.add_argument("--num-samples", type=int, help="Calibration windows.")
    p.add_argument("--calibration-length", type=int, help="Tokens per calibration window (default 128).")
    p.add_argument("--method", choices=["obs", "magnitude"], help="Pruning database method (default obs).")
    p.add_argument("--database-dir", help="Where the pruning database is kept (resumable); default in the cache.")
    p.add_argument("--latency-table", help="Use this latency table instead of measuring one.")
    p.add_argument("--recovery", choices=["none", "gap", "layerwise", "auto"],
                   help="Few-sample recovery after verify, every pruned zero held: gap (global AdaPrune, the "
                        "model against the dense one, its pruned blocks read from disk a block at a time), layerwise (block by block, less memory), none, or auto (the "
                        "default: gap where its memory is free, else layerwise for encoders and none for causal LMs).")
    p.add_argument("--recovery-rank", type=int, metavar="R",
                   help="gap trains updates of rank R of the kept weights, added in at the end, instead of the "
                        "weights themselves (recovery.rank): recovery then holds one pass and the dense model's shared part, no "
                        "gradients or Adam state of the model's weights.")
    p.add_argument("--seed", type=int, help="Seed of the search and of the calibration windows.")
    p.add_argument("--max-candidates", type=_candidates,
                   help="Most candidate profiles the search scores (search.max_candidates, default 600; each costs "
                        "one scoring pass, the job's main cost on a large model); 'none': SPDY's full schedule.")
    p.add_argument("--trust-remote-code", action="store_true", help="Allow the model's own code (off by default).")
    p.add_argument("--allow-shortfall", action="store_true",
                   help="Exit 0 even when the measured speedup misses the target (by more than "
                   "search.target_tolerance); by default that exits with code 3, after writing the output.")
    p.add_argument("--push-to-hub", metavar="REPO", help="Also upload the output directory to this Hub repo.")
    p.add_argument("--private", action="store_true", help="Create the Hub repo as private.")
    p.add_argument("--no-progress", action="store_true", help="Hide progress bars.")
    p.set_defaults(func=prune_command)
    return p


def _targets(text: str) -> list[float]:
    try:
        targets = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a speedup or a comma-separated list of them (1.25,1.5,2.0)"
                                         ) from None
    if not targets:
        raise argparse.ArgumentTypeError("no target speedup given")
    return targets


def _candidates(text: str) -> int | str:
    if text.lower() in ("none", "null"):
        return "none"
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither a number of candidates nor 'none'") from None


def _build_config(args):
    """The job's config: the recipe (if any), then the flags; an unknown level family is an error here, before any
    model is loaded."""
    from .families import family_for

    config = _config_from(args)
    family_for(config)
    return config


def _config_from(args):
    from .config import SPDYConfig

    data = SPDYConfig.load(args.recipe).to_dict() if args.recipe else {}
    if getattr(args, "target_speedup", None) is not None:
        data["target_speedup"] = args.target_speedup[0]  # several: the run sets each in turn
    if getattr(args, "latency_table", None) is not None:
        data["latency_table"] = args.latency_table
    if args.backend is not None:
        if args.backend != data.get("backend", "cpu") and data.get("levels") in ("spdy", "2:4"):
            data["levels"] = "auto"  # a recipe's resolved default follows the backend given here
        data["backend"] = args.backend
    regime = data.setdefault("regime", {})
    if args.dtype is not None:
        regime["dtype"] = args.dtype
    if args.batch_size is not None:
        regime["batch_size"] = args.batch_size
    if args.sequence_length is not None:
        regime["sequence_length"] = args.sequence_length
    if args.regime is not None:
        regime["mode"] = args.regime
    if args.context_length is not None:
        regime["context_length"] = args.context_length
    if getattr(args, "logits", None) is not None:
        regime["logits"] = args.logits
    if getattr(args, "family", None) is not None:
        data["family"] = args.family
    if not hasattr(args, "calibration"):  # the profile command: no calibration or search flags
        return SPDYConfig.from_dict(data)
    calibration = data.setdefault("calibration", {})
    if args.calibration is not None:
        calibration["source"] = args.calibration
    for flag, key in (("dataset_config", "dataset_config"), ("split", "split"), ("text_column", "text_column"),
                      ("num_samples", "num_samples"), ("calibration_length", "sequence_length")):
        if getattr(args, flag) is not None:
            calibration[key] = getattr(args, flag)
    if args.method is not None:
        data["method"] = args.method
    if args.recovery is not None:
        data.setdefault("recovery", {})["method"] = args.recovery
    if args.recovery_rank is not None:
        data.setdefault("recovery", {})["rank"] = args.recovery_rank
    if args.database_dir is not None:
        data.setdefault("database", {})["dir"] = args.database_dir
    if args.max_candidates is not None:
        data.setdefault("search", {})["max_candidates"] = None if args.max_candidates == "none" else args.max_candidates
    if args.seed is not None:
        calibration["seed"] = args.seed
        data.setdefault("search", {})["seed"] = args.seed
    return SPDYConfig.from_dict(data)


def _default_output(model: str | None, target: float) -> str:
    name = os.path.basename(os.path.normpath(model)) if model else "all-MiniLM-L6-v2"
    return f"spdy-{name}-{target:g}x"


def prune_command(args) -> int:
    from .latency.backend import working_dtype
    from .modeling.loading import load_model_and_tokenizer
    from .output.result import check_output_dir
    from .pruner import SPDYPruner, check_targets
    from .utils.processes import current_processes

    config = _build_config(args)
    targets = check_targets(args.target_speedup or [config.target_speedup])
    if len(targets) > 1:
        outputs = [os.path.join(args.output or ".", _default_output(args.model, t)) for t in targets]
    else:
        outputs = [args.output or _default_output(args.model, targets[0])]
    for output in outputs:  # before any work: never find out after 10 minutes
        check_output_dir(output, args.overwrite)
    model, tokenizer = load_model_and_tokenizer(args.model, trust_remote_code=args.trust_remote_code,
                                                dtype=working_dtype(config.backend, config.regime.dtype))
    pruner = SPDYPruner(model, config, tokenizer=tokenizer)
    if not current_processes(cuda=config.backend == "cuda").is_main:  # a helping process of `accelerate launch`
        for _ in pruner.prune_targets(targets, progress=False):
            pass  # it yields nothing: the main process writes every output
        return 0
    if len(targets) == 1:
        written = [_save(pruner.prune(progress=not args.no_progress), outputs[0], args.overwrite)]
    else:
        written = [_save(result, output, args.overwrite) for result, output in
                   zip(pruner.prune_targets(targets, progress=not args.no_progress), outputs)]
        print(f"{len(targets)} targets in one run: stage seconds summed over them {json.dumps(pruner.stage_seconds)}")
    missed = [(path, r) for path, r in written if r.get("target_met") is False]
    if missed and not args.allow_shortfall:
        for path, r in missed:
            busy = r.get("verify_busy")
            why = "" if not busy else (f", measured while the machine was busy (the dense model took "
                                       f"{busy['dense_ms_now']:.1f} ms, {busy['dense_ms_profiled']:.1f} ms when "
                                       "profiled), so it is not confirmed")
            print(f"spdy-hf: target missed: measured {r['measured_speedup']:.3f}x for a {r['target_speedup']:g}x "
                  f"target (tolerance {100 * config.search.target_tolerance:g}%){why}. The output is written to "
                  f"{path}, marked target_met: false in spdy_report.json and on the model card; it was not pushed. "
                  "Measure again on an idle machine (delete the latency cache), or pass --allow-shortfall to accept "
                  "it.", file=sys.stderr)
    if args.push_to_hub:
        from .integrations.hub import push_folder, push_targets

        met = [(path, r) for path, r in written if args.allow_shortfall or r.get("target_met") is not False]
        if len(targets) == 1 and met:
            print(f"Pushed to {push_folder(met[0][0], args.push_to_hub, private=args.private or None)}")
        elif met:
            for repo, url in push_targets(met, args.push_to_hub, private=args.private or None):
                print(f"Pushed {repo} to {url}" if repo is not None else f"Collection: {url}")
    return SHORTFALL_EXIT if missed and not args.allow_shortfall else 0


def _save(result, output: str, overwrite: bool) -> tuple[str, dict]:
    """Writes one result and prints its summary; returns where it went and its report."""
    path = result.save_pretrained(output, overwrite=overwrite)
    r = result.report
    print(f"Pruned model written to {path}")
    print(f"  target speedup     {r['target_speedup']:.3f}x")
    print(f"  predicted speedup  {r['predicted_speedup']:.3f}x (max reachable {r['max_reachable_speedup']:.3f}x)")
    if r["measured_speedup"] is None:
        print(f"  measured speedup   not verified: {r['verify_skipped']}")
    else:
        print(f"  measured speedup   {r['measured_speedup']:.3f}x "
              f"(dense {r['dense_time_ms']:.2f} ms, pruned {r['pruned_time_ms']:.2f} ms)")
    print(f"  overall sparsity   {r['overall_sparsity']:.4f}")
    print(f"  score ({r['score_kind']})  {r['score_dense_vs_pruned']:.6g}")
    print(f"  stage seconds      {json.dumps(r['stage_seconds'])}")
    peaks = [v for v in r.get("stage_peak_rss_mb", {}).values() if v is not None]
    if peaks:
        print(f"  peak memory        {max(peaks) / 1024:.2f} GiB (by stage, MiB: {json.dumps(r['stage_peak_rss_mb'])})")
    return path, r


def eval_command_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "eval", help="Measure a saved pruned model against its base on held-out text.",
        description="Held-out quality of DIR (written by spdy-hf prune) and of BASE (default: the base DIR records) on "
        "the same token windows: perplexity for causal LMs, mean-pooled embedding cosine for encoders.")
    p.add_argument("directory", help="A directory written by spdy-hf prune (any plain checkpoint works).")
    p.add_argument("base", nargs="?", default=None, help="The dense model: directory, Hub id or .gguf file.")
    p.add_argument("--data", default="builtin", help="'builtin' (the built-in corpus's held-out split), a local "
                   "file or a Hub dataset name (default builtin).")
    p.add_argument("--dataset-config", help="Hub dataset configuration name.")
    p.add_argument("--split", default="test", help="Dataset split (default test).")
    p.add_argument("--text-column", default="text", help="Column holding the text (default text).")
    p.add_argument("--num-samples", type=int, default=16, help="Held-out windows (default 16).")
    p.add_argument("--sequence-length", type=int, default=256, help="Tokens per window (default 256).")
    p.add_argument("--output", "-o", help="Also write the results as JSON here.")
    p.add_argument("--trust-remote-code", action="store_true", help="Allow the models' own code (off by default).")
    p.set_defaults(func=eval_command)
    return p


def eval_command(args) -> int:
    from .errors import SPDYError
    from .pipeline.quality import evaluate_saved
    from .utils.io import atomic_write_text

    if args.num_samples < 1 or args.sequence_length < 8:
        raise SPDYError("--num-samples must be at least 1 and --sequence-length at least 8.")
    out = evaluate_saved(args.directory, args.base, args.data, args.num_samples, args.sequence_length,
                         dataset_config=args.dataset_config, split=args.split, text_column=args.text_column,
                         trust_remote_code=args.trust_remote_code)
    if out["metric"] == "perplexity":
        print(f"Held-out perplexity ({out['windows']} x {out['sequence_length']} tokens of {out['source']}): "
              f"base {out['base']:.3f}, pruned {out['pruned']:.3f}")
    else:
        print(f"Held-out embedding cosine, pruned vs base ({out['windows']} windows of {out['source']}): "
              f"{out['pruned']:.4f}")
    if args.output:
        atomic_write_text(args.output, json.dumps(out, indent=2) + "\n")
    return 0


def push_command_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("push", help="Upload a saved SPDY model directory to the Hub (or retry an upload).",
                              description="Upload DIR (written by spdy-hf prune) to the Hub repo REPO, with its "
                              "model card. The token comes from `hf auth login` or HF_TOKEN.")
    p.add_argument("directory", help="A directory written by spdy-hf prune.")
    p.add_argument("repo", help="Hub repo id, e.g. me/minilm-spdy-1.5x.")
    p.add_argument("--private", action="store_true", help="Create the repo as private.")
    p.set_defaults(func=push_command)
    return p


def push_command(args) -> int:
    from .integrations.hub import push_folder

    url = push_folder(args.directory, args.repo, private=args.private or None)
    print(f"Pushed {args.directory} to {url}")
    return 0


def export_command_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "export", help="Write a model for llama.cpp (GGUF) or ONNX Runtime (ONNX), removed heads and neurons cut out.",
        description="Export MODEL (a directory written by spdy-hf prune, a dense directory, a Hub id or a .gguf file) "
        "physically shrunk: GGUF for Llama-family decoders (llama.cpp, per-block widths), ONNX for encoders and "
        "causal LMs' prefill logits (ONNX Runtime). A dense model exports as it is, for the baseline.")
    p.add_argument("model", help="What to export.")
    p.add_argument("--format", choices=("gguf", "onnx"), help="Default: from the output's suffix.")
    p.add_argument("--output", "-o", required=True, help="The file to write (.gguf or .onnx).")
    p.add_argument("--dtype", choices=("float16", "bfloat16", "float32"), default="float16",
                   help="GGUF weight type (default float16; quantise further with llama.cpp's llama-quantize).")
    p.add_argument("--tokenizer-from", help="A GGUF file of the same model whose tokenizer is copied (default for a "
                   ".gguf MODEL: that file; otherwise the tokenizer is built from the model's own).")
    p.add_argument("--tokenizer-pre", help="llama.cpp's pre-tokenizer name, where it cannot be read off the "
                   "tokenizer.")
    p.add_argument("--overwrite", action="store_true", help="Replace the output file if it exists.")
    p.add_argument("--time", action="store_true",
                   help="Then time the export against the dense model exported the same way, in its engine (ONNX "
                   "Runtime; llama.cpp through llama-cpp-python), in the regime the model was pruned for; with a "
                   "saved output as MODEL, the speedup goes into its spdy_report.json and model card.")
    p.add_argument("--dense", help="--time: the dense model (default: the base a saved output records).")
    p.add_argument("--threads", type=int, help="--time: the engine's threads (default: every core).")
    p.add_argument("--repeats", type=int, default=10, help="--time: timed calls of each model (default 10).")
    p.add_argument("--trust-remote-code", action="store_true", help="Allow the model's own code (off by default).")
    p.set_defaults(func=export_command)
    return p


def export_command(args) -> int:
    from .errors import SPDYError
    from .export import export_model

    if args.time and args.repeats < 1:
        raise SPDYError("--repeats must be at least 1.")
    path = export_model(args.model, args.output, args.format, dtype=args.dtype, tokenizer_from=args.tokenizer_from,
                        tokenizer_pre=args.tokenizer_pre, overwrite=args.overwrite,
                        trust_remote_code=args.trust_remote_code)
    print(f"Wrote {path}")
    if args.time:
        from .export import time_export

        entry = time_export(args.model, path, dense=args.dense, dtype=args.dtype, tokenizer_from=args.tokenizer_from,
                            tokenizer_pre=args.tokenizer_pre, threads=args.threads, repeats=args.repeats,
                            trust_remote_code=args.trust_remote_code)
        for what, t in entry["timings"].items():
            print(f"  {entry['engine']} {what}: dense {t['dense_ms']:.2f} ms, pruned {t['pruned_ms']:.2f} ms, "
                  f"{t['speedup']:.3f}x ({entry['threads']} threads)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The `spdy-hf` command line: prune, profile, eval, push, export."""
    parser = argparse.ArgumentParser(prog="spdy-hf", description="Speedup-targeted pruning for Hugging Face models.")
    parser.add_argument("-v", "--verbose", action="store_true", help="Log debug messages.")
    subparsers = parser.add_subparsers(dest="command", required=True)
    prune_command_parser(subparsers)
    profile_command_parser(subparsers)
    eval_command_parser(subparsers)
    push_command_parser(subparsers)
    export_command_parser(subparsers)
    return parser


def _helping_process() -> bool:
    """Whether this is one of the helping processes `accelerate launch` started (rank > 0): it logs warnings only."""
    from .utils.processes import launched_size

    return launched_size() > 1 and os.environ.get("RANK", "0") != "0"


def main(argv: list[str] | None = None) -> int:
    from .errors import SPDYError
    from .utils.processes import launched_size, run_alone

    args = build_parser().parse_args(argv)
    helping = _helping_process()
    logging.basicConfig(level=logging.WARNING if helping else logging.DEBUG if args.verbose else logging.INFO,
                        format=f"%(asctime)s %(levelname)s {'[process ' + os.environ['RANK'] + '] ' if helping else ''}"
                               "%(name)s: %(message)s")
    if args.command != "prune" and launched_size() > 1:  # only a prune shares its work: the main process runs the
        if helping:                                       # other commands alone
            return 0
        run_alone()
    try:
        return args.func(args)
    except SPDYError as e:
        print(f"spdy-hf: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("spdy-hf: interrupted; nothing was written.", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
