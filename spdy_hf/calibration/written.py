"""Calibration text a language model writes: everyday English on many subjects, for a corpus wider than software
documentation without a download.

`writing_prompts()` crosses kinds of writing (a story, a news report, a letter, a dialogue, an explanation, ...)
with everyday subjects (cooking, a football match, a storm, a job interview, ...): 24 kinds x 48 subjects, in a fixed
shuffled order. `write_texts` has a causal LM answer them, sampled with a fixed seed, through the model's chat
template where it has one. The package ships what SmolLM2-135M-Instruct wrote this way (`written_corpus()`,
part of `calibration.source: builtin`); `python -m spdy_hf.calibration.written --model GGUF_OR_DIR -o FILE.jsonl.gz`
writes it again, or with another model.

The prompts name no Python, no code and no licences: the text they draw out is of other domains than the built-in
docstrings, and held apart from the project's evaluation sets (quotations, dictionary definitions, scripture,
licence texts).
"""

from __future__ import annotations

import argparse
import gzip
import json
import logging
import os
import random
from functools import lru_cache

import torch
from tqdm.auto import tqdm

from ..errors import SPDYError

logger = logging.getLogger(__name__)

CORPUS_FILE = os.path.join(os.path.dirname(__file__), "data", "written.jsonl.gz")

KINDS = [
    "Write a short story about {}.",
    "Write a news report about {}.",
    "Write a friendly letter to a relative about {}.",
    "Write a dialogue between two friends talking about {}.",
    "Explain to a child how {} works.",
    "Write a diary entry about {}.",
    "Write a short essay giving your opinion on {}.",
    "Write a product review that mentions {}.",
    "Describe {} in vivid detail.",
    "Write a speech for a school assembly about {}.",
    "Write an encyclopedia paragraph about {}.",
    "Write a complaint email to a company about {}.",
    "Give practical advice to a beginner about {}.",
    "Write a travel blog post that involves {}.",
    "Write a short history of {}.",
    "Write an interview with an expert on {}.",
    "Write a poem about {}.",
    "Write a forum post asking for help with {}.",
    "Summarize a debate about {}.",
    "Write a magazine article about {}.",
    "Write the opening of a novel that begins with {}.",
    "Write a text message conversation about {}.",
    "Write a weather and traffic update that mentions {}.",
    "Write a restaurant menu description involving {}.",
]

SUBJECTS = [
    "baking bread at home", "a football match in the rain", "a storm over a fishing village", "a job interview",
    "a lost dog finding its way home", "the first day at a new school", "growing tomatoes in a small garden",
    "a train journey across the mountains", "saving money for a house", "a visit to the dentist",
    "the history of the bicycle", "a wedding in a small town", "learning to play the violin",
    "volcanoes and earthquakes", "a neighbourhood street market", "the life of honey bees", "a broken washing machine",
    "climbing a mountain in winter", "the election of a new mayor", "a family reunion", "the phases of the moon",
    "a hospital night shift", "a chess tournament", "recycling and waste", "a birthday surprise party",
    "the migration of birds", "renting a first apartment", "a power cut in the city", "the invention of the telephone",
    "a summer festival", "caring for an elderly parent", "a shipwreck", "running a small bakery",
    "the water cycle", "a detective solving a theft", "a long-distance friendship", "vaccines and the immune system",
    "a farmer's harvest", "a science fair", "an old castle", "buying a used car", "a marathon",
    "the stock market falling", "a rainy afternoon in a library", "a cooking competition", "ancient Rome",
    "a flight delay at the airport", "making new friends as an adult",
]


def writing_prompts(seed: int = 0) -> list[str]:
    """Every kind of writing crossed with every subject, in an order fixed by `seed`."""
    prompts = [kind.format(subject) for kind in KINDS for subject in SUBJECTS]
    random.Random(seed).shuffle(prompts)
    return prompts


def _chat(tokenizer, prompt: str) -> str:
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
    return prompt + "\n\n"


@torch.inference_mode()
def write_texts(model, tokenizer, prompts: list[str], max_new_tokens: int = 192, temperature: float = 0.7,
                top_p: float = 0.9, repetition_penalty: float = 1.15, batch_size: int = 16, seed: int = 0,
                progress: bool = True) -> list[str]:
    """The model's answers to `prompts`, sampled (`temperature`, `top_p`, and a `repetition_penalty` that keeps a
    small model out of loops) with a fixed seed; answers of fewer than 20 words are dropped."""
    if not callable(getattr(model, "generate", None)):
        raise SPDYError("Writing calibration text needs a causal language model (one with `generate`).")
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    torch.manual_seed(seed)
    texts = []
    try:
        for i in tqdm(range(0, len(prompts), batch_size), desc="Writing calibration text", disable=not progress):
            batch = [_chat(tokenizer, p) for p in prompts[i:i + batch_size]]
            enc = tokenizer(batch, return_tensors="pt", padding=True, add_special_tokens=False)
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=True, temperature=temperature,
                                 top_p=top_p, repetition_penalty=repetition_penalty, pad_token_id=pad)
            for row in out[:, enc["input_ids"].shape[1]:]:
                text = tokenizer.decode(row, skip_special_tokens=True).strip()
                if len(text.split()) >= 20:
                    texts.append(text)
    finally:
        tokenizer.padding_side = side
    return texts


@lru_cache(maxsize=1)
def written_corpus() -> tuple[str, ...]:
    """The texts SmolLM2-135M-Instruct wrote for the package (`writing_prompts`), one per answer."""
    if not os.path.isfile(CORPUS_FILE):
        raise SPDYError(f"The written corpus {CORPUS_FILE} is missing from this install of spdy_hf; reinstall it, "
                        "or pass calibration text.")
    with gzip.open(CORPUS_FILE, "rt", encoding="utf-8") as f:
        return tuple(json.loads(line) for line in f if line.strip())


def main(argv: list[str] | None = None) -> int:
    from ..modeling.loading import load_model_and_tokenizer

    parser = argparse.ArgumentParser(description="Have a causal LM write calibration text from the writing prompts.")
    parser.add_argument("--model", required=True, help="A causal LM: a local directory, Hub id or .gguf file.")
    parser.add_argument("-o", "--output", required=True, help="A .jsonl or .jsonl.gz file: one answer a line, as a "
                        "JSON string.")
    parser.add_argument("--max-new-tokens", type=int, default=192)
    parser.add_argument("--limit", type=int, default=None, help="Answer only the first N prompts.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    if os.path.exists(args.output):
        raise SPDYError(f"{args.output} exists; choose another path or remove it.")
    model, tokenizer = load_model_and_tokenizer(args.model)
    texts = write_texts(model.eval(), tokenizer, writing_prompts(args.seed)[: args.limit],
                        max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, seed=args.seed)
    tmp = args.output + ".tmp"
    opener = gzip.open if args.output.endswith(".gz") else open
    with opener(tmp, "wt", encoding="utf-8") as f:
        f.writelines(json.dumps(t, ensure_ascii=False) + "\n" for t in texts)
    os.replace(tmp, args.output)
    logger.info("Wrote %d texts to %s.", len(texts), args.output)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
