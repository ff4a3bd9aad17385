"""`posttrain run` end to end on the tiny model, its report, plots and viewer (rendered in a
real headless browser), resume after a kill between stages, and the config-change guard."""
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from posttrain import pipeline
from posttrain.config import ConfigError, load_config
from conftest import hostile_page

@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_model_dir, tiny_args):
    out = tmp_path_factory.mktemp("pipe") / "run"
    cfg = load_config(None, tiny_args(tiny_model_dir, out))
    timings = pipeline.run(cfg)
    return cfg, timings


def test_run_writes_every_stage(finished):
    cfg, timings = finished
    d = cfg.run_dir
    assert set(timings) == {"sft", "generate", "rl", "eval", "plot", "view"}
    for f in (
        "sft/adapter/adapter_config.json",
        "generate/stats.json",
        "rl/adapter/adapter_config.json",
        "eval/report.json",
        "eval/report.md",
        "eval/samples.jsonl",
        "eval/prompts.jsonl",
        "view/index.html",
        "pipeline.json",
    ):
        assert (d / f).is_file(), f
    for png in ("lengths.png", "lengths_overlay.png", "sft_training.png", "rl_training.png",
                "frontier.png"):
        data = (d / "plots" / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, png


def test_report_schema(finished):
    cfg, _ = finished
    report = json.loads((cfg.run_dir / "eval" / "report.json").read_text())
    assert set(report["models"]) == {"base", "sft", "rl"}
    for name, m in report["models"].items():
        assert m["n"] == 6
        assert set(m["length_chars"]) >= {"mean", "var", "std", "p5", "p50", "p95"}
        for key in ("rougeL", "rouge1", "rouge2", "eos_rate", "truncation_rate", "abrupt_rate"):
            assert isinstance(m[key], float), (name, key)
        assert m["length_chars"]["var"] == pytest.approx(m["length_chars"]["std"] ** 2)
    rl = report["models"]["rl"]
    assert rl["kl_k3"] >= 0
    # per summary: the per-token figure times the mean completion tokens (EOS counted)
    samples = [
        json.loads(l) for l in (cfg.run_dir / "eval" / "samples.jsonl").read_text().splitlines()
    ]
    tokens = [s["length_tokens"] + s["ended_with_eos"] for s in samples if s["model"] == "rl"]
    assert rl["kl_k3_summary"] == pytest.approx(rl["kl_k3"] * sum(tokens) / len(tokens), rel=1e-6)
    klo, khi = rl["kl_k3_summary_ci95"]
    assert klo <= rl["kl_k3_summary"] <= khi
    # the best-of-N frontier of every model from its own samples, N = 1..samples per prompt
    f = report["frontier"]
    assert f["budget"] == {"n": 3, "kl_per_summary": pytest.approx(0.4319, abs=1e-4)}
    for name, table in f["tables"].items():
        assert [r["n"] for r in table] == [1, 2]
        assert table[0]["var"] == pytest.approx(report["models"][name]["length_chars"]["var"])
    assert f["tables"]["sft"][0]["ratio"] == pytest.approx(1.0)
    assert f["rl"]["ratio"] == pytest.approx(report["variance_ratio"])
    assert f["rl"]["kl_per_summary"] == rl["kl_k3_summary"]
    md = (cfg.run_dir / "eval" / "report.md").read_text()
    assert "RL against the frontier" in md and "| sft | 2 | 0.19 |" in md
    assert report["variance_ratio"] == pytest.approx(
        report["models"]["sft"]["length_chars"]["var"]
        / report["models"]["rl"]["length_chars"]["var"]
    )
    lo, hi = report["variance_ratio_ci95"]
    assert lo <= hi
    # every model sampled the same prompts
    assert {
        m: sorted(s["prompt_index"] for s in samples if s["model"] == m) for m in ("sft", "rl")
    } == {m: [0, 0, 1, 1, 2, 2] for m in ("sft", "rl")}


def test_second_run_skips_every_stage(finished, capsys):
    cfg, _ = finished
    before = (cfg.run_dir / "rl" / "summary.json").stat().st_mtime_ns
    pipeline.run(cfg)
    out = capsys.readouterr().out
    for stage in ("sft", "generate", "rl", "eval"):
        assert f"{stage} already done" in out
    assert (cfg.run_dir / "rl" / "summary.json").stat().st_mtime_ns == before
    assert "variance ratio SFT/RL" in out and "viewer:" in out


@pytest.mark.slow
def test_changed_config_is_refused_unless_forced(finished, tmp_path, tiny_args):
    cfg, _ = finished
    work = tmp_path / "copy"
    shutil.copytree(cfg.run_dir, work)
    changed = load_config(None, tiny_args(cfg.model.name, work, "rl.max_lr=5e-3"))
    with pytest.raises(ConfigError, match=r"rl.max_lr: 0.01 in .*0.005 now"):
        pipeline.run(changed)
    assert (work / "rl" / "summary.json").is_file()          # nothing was thrown away
    sft_time = (work / "sft" / "summary.json").stat().st_mtime_ns
    pipeline.run(changed, force=True)
    assert (work / "sft" / "summary.json").stat().st_mtime_ns == sft_time   # upstream kept
    assert "max_lr: 0.005" in (work / "rl" / "config.yaml").read_text()


@pytest.mark.slow
def test_kill_between_stages_then_resume(tiny_model_dir, tmp_path, tiny_args):
    out = tmp_path / "run"
    (tmp_path / "tiny.yaml").write_text("seed: 42\n")   # the defaults (offline RL), not the demo
    args = ("--config", str(tmp_path / "tiny.yaml"), *tiny_args(tiny_model_dir, out))
    proc = subprocess.Popen([sys.executable, "-m", "posttrain", "run", *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (out / "generate" / "stats.json").is_file():   # SFT and generate are done
        assert proc.poll() is None and time.time() < deadline, "pipeline ended early"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "eval" / "report.json").exists()
    kept = {s: (out / s / f).stat().st_mtime_ns for s, f in (("sft", "summary.json"),
                                                            ("generate", "stats.json"))}
    r = subprocess.run([sys.executable, "-m", "posttrain", "run", *args], capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "Warning" not in r.stderr, r.stderr[-3000:]    # no library noise on the console
    assert "sft already done" in r.stdout and "generate already done" in r.stdout
    assert {s: (out / s / f).stat().st_mtime_ns for s, f in (("sft", "summary.json"),
                                                            ("generate", "stats.json"))} == kept
    assert (out / "eval" / "report.json").is_file() and (out / "view" / "index.html").is_file()


# ---------------------------------------------------------------- the viewer in a browser

def _browser():
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if path := shutil.which(name):
            return path
    return None


def dump_dom(html: Path, fragment: str = "") -> str:
    browser = _browser()
    if browser is None:
        pytest.skip("no chromium or chrome on this machine (CI installs Debian's chromium)")
    r = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu",
                        "--user-data-dir=" + str(html.parent / ".chrome"), "--dump-dom",
                        html.resolve().as_uri() + fragment],
                       capture_output=True, text=True, timeout=60)  # a page that alerts hangs
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout


@pytest.mark.slow   # a real browser
def test_viewer_renders_samples_as_text_in_browser(tmp_path):
    dom = dump_dom(hostile_page(tmp_path))
    assert 'class="card"' in dom and "showing 2 of 2 prompts" in dom
    # hostile text arrives as text, never as elements
    assert "&lt;script&gt;alert(3)&lt;/script&gt; sft" in dom
    assert "&lt;img src=x onerror=alert(2)&gt;" in dom
    assert "<img" not in dom and "<b>bold" not in dom and "<i>ref" not in dom
    assert "pwned" not in dom.split("<body", 1)[0]      # the title was not rewritten
    assert 'x" onerror="alert(4) rl' in dom


@pytest.mark.slow   # a real browser
def test_viewer_filter_and_sort_in_browser(tmp_path):
    page = hostile_page(tmp_path)
    dom = dump_dom(page, "#q=zebra")
    assert (
        "showing 1 of 2 prompts" in dom and 'data-index="1"' in dom and 'data-index="0"' not in dom
    )
    dom = dump_dom(page, "#sub=evil")
    assert "showing 1 of 2 prompts" in dom and 'data-index="0"' in dom
    # RL - SFT: prompt 0 is +5, prompt 1 is -17: ascending puts prompt 1 first
    dom = dump_dom(page, "#sort=diff_asc")
    assert dom.index('data-index="1"') < dom.index('data-index="0"')


@pytest.mark.slow   # a real browser
def test_viewer_of_a_real_run_in_browser(finished):
    cfg, _ = finished
    dom = dump_dom(cfg.run_dir / "view" / "index.html")
    assert "showing 3 of 3 prompts" in dom
    assert dom.count('data-model="rl"') == 3 and dom.count('data-model="sft"') == 3
    assert "KL / summary" in dom and 'id="frontier"' in dom and "nats (best-of-3 budget" in dom
