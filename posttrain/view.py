"""The view stage: one self-contained HTML page to read the samples side by side.

Reads `<out_dir>/eval/{prompts,samples}.jsonl` and `report.json`; writes
`<out_dir>/view/index.html`: no network, no CDN, opens from disk in any browser.

For each held-out prompt: the post, the reference summary, and each model's summary with its
length and reward; per-model length histograms; sorting (by RL - SFT length difference, by
reference length) and filtering (subreddit, text search). The filter and sort live in the
URL's hash (`#q=cat&sub=tifu&sort=diff_desc&sample=1`), so a view can be shared as a link.

Safety: the data travels as JSON inside a `<script type="application/json">` block with
`<`, `>` and `&` escaped as \\u003c, \\u003e, \\u0026 (it cannot close the block), and the
page only ever puts it into the document as text (`textContent`), never as HTML.
"""
from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

from posttrain.config import Config
from posttrain.io import atomic_write_text, read_json, read_jsonl

# the page, with `__DATA__` where the data goes (a package file, so it reads as HTML)
TEMPLATE = (resources.files("posttrain") / "view.html").read_text(encoding="utf-8")


def safe_json(obj) -> str:
    """JSON that is inert inside an HTML <script> block."""
    return (json.dumps(obj, ensure_ascii=False).replace("<", "\\u003c").replace(">", "\\u003e")
            .replace("&", "\\u0026").replace("\u2028", "\\u2028").replace("\u2029", "\\u2029"))


def page_data(prompts: list[dict], samples: list[dict], report: dict, title: str) -> dict:
    order = ["base", "sft", "rl"]
    models = sorted({s["model"] for s in samples}, key=lambda m: (order + [m]).index(m))
    by_model = {m: {} for m in models}
    for s in samples:
        by_model.setdefault(s["model"], {}).setdefault(s["prompt_index"], []).append(
            {k: s.get(k) for k in ("completion", "length_chars", "length_tokens", "reward",
                                   "truncated", "rougeL", "target")})
    return {"title": title, "models": models, "prompts": prompts, "samples": by_model,
            "report": report}


def render(data: dict) -> str:
    return TEMPLATE.replace("__DATA__", safe_json(data))


def run(cfg: Config) -> Path:
    """Write view/index.html from the eval outputs; returns its path."""
    ev = cfg.run_dir / "eval"
    hint = "run `posttrain eval` (again) first"
    prompts = read_jsonl(ev / "prompts.jsonl", {"prompt_index": int, "prompt": str}, hint)
    samples = read_jsonl(ev / "samples.jsonl",
                         {"model": str, "prompt_index": int, "completion": str}, hint)
    report = read_json(ev / "report.json", hint) if (ev / "report.json").is_file() else {}
    out = cfg.run_dir / "view" / "index.html"
    atomic_write_text(out, render(page_data(prompts, samples, report, str(cfg.run_dir))))
    print(f"view: wrote {out} ({len(prompts)} prompts); open it in a browser")
    return out

