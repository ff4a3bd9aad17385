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
from pathlib import Path

from posttrain.config import Config
from posttrain.io import atomic_write_text, read_json, read_jsonl


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
    prompts = read_jsonl(ev / "prompts.jsonl", ("prompt_index", "prompt"), hint)
    samples = read_jsonl(ev / "samples.jsonl", ("model", "prompt_index", "completion"), hint)
    report = read_json(ev / "report.json", hint) if (ev / "report.json").is_file() else {}
    out = cfg.run_dir / "view" / "index.html"
    atomic_write_text(out, render(page_data(prompts, samples, report, str(cfg.run_dir))))
    print(f"view: wrote {out} ({len(prompts)} prompts); open it in a browser")
    return out


TEMPLATE = r"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; style-src 'unsafe-inline'; script-src 'unsafe-inline'; img-src data:">
<title>posttrain samples</title>
<style>
body{font:14px/1.45 system-ui,sans-serif;margin:0;background:#f6f6f4;color:#222}
header{background:#fff;border-bottom:1px solid #ddd;padding:12px 20px;position:sticky;top:0;z-index:2}
h1{font-size:17px;margin:0 0 6px}
#summary{font-size:13px;color:#444;margin-bottom:8px}
#summary table{border-collapse:collapse}#summary td,#summary th{padding:1px 8px;text-align:right}
.controls{display:flex;gap:10px;flex-wrap:wrap;align-items:center}
input,select{font:inherit;padding:3px 6px}
#hists{display:flex;gap:16px;padding:10px 20px;flex-wrap:wrap}
.hist{background:#fff;border:1px solid #ddd;border-radius:6px;padding:6px 10px}
.hist h3{font-size:13px;margin:0 0 4px}
main{padding:0 20px 40px}
.card{background:#fff;border:1px solid #ddd;border-radius:6px;margin:12px 0;padding:10px 14px}
.meta{font-size:12px;color:#666}
details pre{white-space:pre-wrap;font:13px/1.4 system-ui,sans-serif;background:#fafafa;padding:8px;margin:4px 0}
.row{display:grid;grid-template-columns:repeat(auto-fit,minmax(230px,1fr));gap:10px;margin-top:8px}
.summ{border-left:4px solid #999;padding:4px 8px;background:#fcfcfc}
.summ.sft{border-color:#1f77b4}.summ.rl{border-color:#d62728}.summ.base{border-color:#7f7f7f}.summ.reference{border-color:#2ca02c}
.summ b{font-size:12px;text-transform:uppercase;letter-spacing:.04em}
.len{font-size:12px;color:#555;float:right}
</style></head>
<body>
<header>
<h1 id="title">posttrain samples</h1>
<div id="summary"></div>
<div class="controls">
<input id="q" type="search" placeholder="search posts and summaries" size="30">
<label>subreddit <select id="sub"><option value="">all</option></select></label>
<label>sort <select id="sort">
<option value="index">prompt order</option>
<option value="diff_desc">RL - SFT length, largest first</option>
<option value="diff_asc">RL - SFT length, smallest first</option>
<option value="absdiff">|RL - SFT length|, largest first</option>
<option value="ref">reference length</option>
</select></label>
<label>sample <select id="sample"></select></label>
<span id="count" class="meta"></span>
</div>
</header>
<div id="hists"></div>
<main id="cards"></main>
<script type="application/json" id="data">__DATA__</script>
<script>
"use strict";
const D = JSON.parse(document.getElementById("data").textContent);
const COLORS = {base: "#7f7f7f", sft: "#1f77b4", rl: "#d62728"};
function el(tag, attrs, text) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  if (text !== undefined && text !== null) e.textContent = String(text);
  return e;
}
function fmt(x, d) { return (x === null || x === undefined) ? "-" : Number(x).toFixed(d); }
function sampleOf(model, p, k) {
  const s = (D.samples[model] || {})[p.prompt_index] || [];
  return s[Math.min(k, s.length - 1)];
}
function summary() {
  document.getElementById("title").textContent = "posttrain samples: " + D.title;
  const box = document.getElementById("summary"), r = D.report || {};
  const t = el("table"), head = el("tr");
  for (const h of ["model", "n", "mean chars", "variance", "std", "EOS", "ROUGE-L"]) head.appendChild(el("th", {}, h));
  t.appendChild(head);
  for (const [m, s] of Object.entries(r.models || {})) {
    const tr = el("tr");
    for (const v of [m, s.n, fmt(s.length_chars.mean, 1), fmt(s.length_chars.var, 0),
                     fmt(s.length_chars.std, 1), fmt(s.eos_rate, 2), fmt(s.rougeL, 1)]) tr.appendChild(el("td", {}, v));
    t.appendChild(tr);
  }
  box.appendChild(t);
  if (r.variance_ratio !== undefined)
    box.appendChild(el("div", {}, "variance ratio SFT/RL " + fmt(r.variance_ratio, 2) +
      " (95% bootstrap " + fmt(r.variance_ratio_ci95[0], 2) + "-" + fmt(r.variance_ratio_ci95[1], 2) +
      "), ROUGE-L RL - SFT " + fmt(r.rougeL_diff, 2) + " points"));
}
function histograms() {
  const box = document.getElementById("hists");
  const all = {};
  for (const m of D.models) all[m] = Object.values(D.samples[m] || {}).flat().map(s => s.length_chars);
  const top = Math.max(1, ...Object.values(all).flat()), nb = 24, W = 260, H = 90;
  for (const m of D.models) {
    const v = all[m]; if (!v.length) continue;
    const counts = new Array(nb).fill(0);
    for (const x of v) counts[Math.min(nb - 1, Math.floor(x / (top + 1) * nb))]++;
    const cmax = Math.max(...counts), mean = v.reduce((a, b) => a + b, 0) / v.length;
    const variance = v.reduce((a, b) => a + (b - mean) ** 2, 0) / v.length;
    const div = el("div", {class: "hist"});
    div.appendChild(el("h3", {}, m + ": mean " + mean.toFixed(1) + ", variance " + variance.toFixed(0)));
    const svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
    svg.setAttribute("width", W); svg.setAttribute("height", H + 14);
    counts.forEach((c, i) => {
      const r = document.createElementNS("http://www.w3.org/2000/svg", "rect");
      const h = c / cmax * H;
      r.setAttribute("x", i * W / nb); r.setAttribute("y", H - h);
      r.setAttribute("width", W / nb - 1); r.setAttribute("height", h);
      r.setAttribute("fill", COLORS[m] || "#555");
      svg.appendChild(r);
    });
    const lab = document.createElementNS("http://www.w3.org/2000/svg", "text");
    lab.setAttribute("x", 0); lab.setAttribute("y", H + 12); lab.setAttribute("font-size", 10);
    lab.textContent = "0 to " + Math.round(top) + " characters";
    svg.appendChild(lab);
    div.appendChild(svg);
    box.appendChild(div);
  }
}
function state() {
  const h = new URLSearchParams(location.hash.slice(1));
  return {q: h.get("q") || "", sub: h.get("sub") || "", sort: h.get("sort") || "index",
          sample: parseInt(h.get("sample") || "1", 10) - 1};
}
function setControls(s) {
  document.getElementById("q").value = s.q;
  document.getElementById("sub").value = s.sub;
  document.getElementById("sort").value = s.sort;
  document.getElementById("sample").value = String(s.sample + 1);
}
function readControls() {
  const h = new URLSearchParams();
  const q = document.getElementById("q").value, sub = document.getElementById("sub").value;
  const sort = document.getElementById("sort").value, sample = document.getElementById("sample").value;
  if (q) h.set("q", q); if (sub) h.set("sub", sub);
  if (sort !== "index") h.set("sort", sort); if (sample !== "1") h.set("sample", sample);
  history.replaceState(null, "", "#" + h.toString());
  render();
}
function diff(p, k) {
  const a = sampleOf("rl", p, k), b = sampleOf("sft", p, k);
  return (a && b) ? a.length_chars - b.length_chars : 0;
}
function render() {
  const s = state(), q = s.q.toLowerCase(), k = Math.max(0, s.sample);
  let ps = D.prompts.filter(p => {
    if (s.sub && p.subreddit !== s.sub) return false;
    if (!q) return true;
    const texts = [p.prompt, p.reference];
    for (const m of D.models) { const x = sampleOf(m, p, k); if (x) texts.push(x.completion); }
    return texts.some(t => t.toLowerCase().includes(q));
  });
  const key = {diff_desc: p => -diff(p, k), diff_asc: p => diff(p, k), absdiff: p => -Math.abs(diff(p, k)),
               ref: p => p.reference_length_chars, index: p => p.prompt_index}[s.sort] || (p => p.prompt_index);
  ps = ps.slice().sort((a, b) => key(a) - key(b));
  const main = document.getElementById("cards");
  main.replaceChildren();
  for (const p of ps) {
    const card = el("section", {class: "card", "data-index": p.prompt_index});
    card.appendChild(el("div", {class: "meta"}, "#" + p.prompt_index + (p.subreddit ? "  r/" + p.subreddit : "")));
    const det = el("details");
    det.appendChild(el("summary", {}, (p.prompt.match(/TITLE:\s*(.*)/) || [null, "post"])[1]));
    det.appendChild(el("pre", {}, p.prompt));
    card.appendChild(det);
    const row = el("div", {class: "row"});
    const ref = el("div", {class: "summ reference"});
    ref.appendChild(el("span", {class: "len"}, p.reference_length_chars + " chars"));
    ref.appendChild(el("b", {}, "reference"));
    ref.appendChild(el("div", {class: "text"}, p.reference));
    row.appendChild(ref);
    for (const m of D.models) {
      const x = sampleOf(m, p, k); if (!x) continue;
      const d = el("div", {class: "summ " + m, "data-model": m});
      d.appendChild(el("span", {class: "len"}, (x.target ? "asked " + x.target + ": " : "") + x.length_chars + " chars, reward " + fmt(x.reward, 2) + (x.truncated ? ", truncated" : "")));
      d.appendChild(el("b", {}, m));
      d.appendChild(el("div", {class: "text"}, x.completion));
      row.appendChild(d);
    }
    card.appendChild(row);
    main.appendChild(card);
  }
  document.getElementById("count").textContent = "showing " + ps.length + " of " + D.prompts.length + " prompts";
}
summary();
histograms();
const subs = [...new Set(D.prompts.map(p => p.subreddit).filter(Boolean))].sort();
for (const s of subs) document.getElementById("sub").appendChild(el("option", {value: s}, "r/" + s));
const per = Math.max(1, ...D.models.map(m => Math.max(0, ...Object.values(D.samples[m] || {}).map(v => v.length))));
for (let i = 1; i <= per; i++) document.getElementById("sample").appendChild(el("option", {value: String(i)}, String(i)));
setControls(state());
for (const id of ["q", "sub", "sort", "sample"]) document.getElementById(id).addEventListener("input", readControls);
window.addEventListener("hashchange", () => { setControls(state()); render(); });
render();
</script>
</body></html>
"""
