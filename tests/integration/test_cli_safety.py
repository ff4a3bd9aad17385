"""The CLI over a corpus of bad inputs and command sequences: each bad input exits non-zero
with one message naming the key, file or stage and no traceback; each sequence ends with the
intended command succeeding; no file that existed before a command changes until its
complete replacement is written, and a kill -9 during a forced redo loses nothing."""
from __future__ import annotations

import hashlib
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from posttrain import __version__, cli, pipeline
from posttrain.config import load_config

# enough SFT steps (one checkpoint each) to kill a redo in the middle
SMALL = ("data.max_train_rows=24", "sft.batch_size=2", "sft.max_steps=0",
         "sft.checkpoint_every=1", "eval.batch_size=1")


def _cli(*args, env=None, timeout=300):
    """The real CLI in its own process, on the dataclass defaults (not the demo)."""
    stage, rest = args[0], args[1:]
    return subprocess.run([sys.executable, "-m", "posttrain", stage, "--config", "defaults",
                           *rest], capture_output=True, text=True, timeout=timeout, env=env)


def _snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _one_error(r, *needles):
    """Exit 2, no traceback, and an error line that names every needle."""
    assert r.returncode == 2, (r.returncode, r.stdout[-1000:], r.stderr[-2000:])
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    errors = [line for line in r.stderr.splitlines() if ": error:" in line]
    assert len(errors) == 1, r.stderr[-2000:]
    for n in needles:
        assert n in r.stderr, (n, r.stderr[-2000:])


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_model_dir, tiny_args):
    """A finished tiny run (offline RL, so every stage has outputs)."""
    out = tmp_path_factory.mktemp("safety") / "run"
    cfg = load_config(None, tiny_args(tiny_model_dir, out, *SMALL))
    pipeline.run(cfg)
    return out


@pytest.fixture
def run_copy(finished, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(finished, out, symlinks=True)
    return out


@pytest.fixture
def args(tiny_model_dir, tiny_args):
    def make(out, *extra):
        return tiny_args(tiny_model_dir, out, *SMALL, *extra)
    return make


# ---------------------------------------------------------------- bad inputs, in process

def _bad_files(tmp: Path) -> dict:
    (tmp / "blank.jsonl").write_text("\n\n  \n")
    rows = [{"prompt": f"post {i}\n\nTL;DR:", "completion": f" s{i}."} for i in range(3)]
    (tmp / "num.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows)
                                   + json.dumps({"prompt": "p", "completion": 5}) + "\n")
    (tmp / "empty4.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows)
                                      + "\n" + json.dumps({"prompt": "p", "completion": " "}))
    (tmp / "section.yaml").write_text("sft: 5\n")
    (tmp / "a_file").write_text("not a folder")


BAD = [  # (id, command line after the stage, the words the message must hold)
    ("negative max_lr", ["sft", "sft.max_lr=-1"], ["sft.max_lr=-1.0 must be > 0"]),
    ("zero max_train_rows", ["sft", "data.max_train_rows=0"], ["data.max_train_rows=0"]),
    ("zero max_eval_rows", ["eval", "data.max_eval_rows=0"], ["data.max_eval_rows=0"]),
    ("zero lora alpha", ["sft", "lora.alpha=0"], ["lora.alpha=0 must be > 0"]),
    ("negative weight decay", ["sft", "sft.weight_decay=-0.1"], ["sft.weight_decay"]),
    ("negative grad norm", ["rl", "rl.max_grad_norm=-1"], ["rl.max_grad_norm"]),
    ("section given a number", ["sft", "--config", "{tmp}/section.yaml"],
     ["section.yaml", "'sft' is a section"]),
    ("section override", ["sft", "sft=5"], ["'sft' is a section"]),
    ("list given a number", ["eval", "eval.targets=80"], ["'eval.targets' expects a list",
                                                          "eval.targets=[80]"]),
    ("targets without a cue", ["eval", "eval.targets=[80]"], ["eval.targets", "data.length_cue"]),
    ("generate.target without a cue", ["generate", "generate.target=100"],
     ["generate.target", "data.length_cue"]),
    ("target_range without a cue", ["rl", "rl.target_range=[50,100]"],
     ["rl.target_range", "data.length_cue"]),
    ("unknown key", ["sft", "sft.learning_rate=1"], ["sft.learning_rate"]),
    ("blank-line jsonl", ["sft", "data.train={tmp}/blank.jsonl"],
     ["blank.jsonl", "only blank lines"]),
    ("row numbers count from 1", ["sft", "data.train={tmp}/empty4.jsonl"],
     ["empty4.jsonl: line 5: empty 'completion'", "data.empty_completions=drop"]),
    ("non-text completion", ["sft", "data.train={tmp}/num.jsonl", "data.empty_completions=drop"],
     ["num.jsonl: line 4", "int 5, expected text"]),
    ("out_dir is a file", ["sft", "out_dir={tmp}/a_file"], ["out_dir=", "is a file"]),
    ("rl before sft", ["rl", "out_dir={tmp}/empty"], ["no SFT adapter", "posttrain sft"]),
    ("eval before rl", ["eval", "out_dir={tmp}/empty"], ["no SFT adapter"]),
    ("plot with nothing", ["plot", "out_dir={tmp}/empty"], ["nothing to plot"]),
    ("view with nothing", ["view", "out_dir={tmp}/empty"], ["prompts.jsonl: missing"]),
]


@pytest.mark.parametrize("name,argv,needles", BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_one_clear_error(name, argv, needles, tmp_path, tiny_model_dir, capsys):
    _bad_files(tmp_path)
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    stage, rest = argv[0], argv[1:]
    if "--config" not in rest:
        rest = ["--config", "defaults", *rest]
    base = [f"model.name={tiny_model_dir}", f"out_dir={tmp_path / 'run'}"]
    rc = cli.main([stage, *base, *rest])   # an unexpected exception would fail the test here
    err = capsys.readouterr().err
    assert rc == 2, err
    assert len([line for line in err.splitlines() if ": error:" in line]) == 1, err
    for n in needles:
        assert n.replace("{tmp}", str(tmp_path)) in err, (n, err)
    if "data.empty_completions=drop" in argv:   # no advice to set what is already set
        assert "set data.empty_completions=drop" not in err


def test_unwritable_out_dir_is_one_clear_error(tmp_path, tiny_model_dir, capsys, monkeypatch):
    def denied(*a, **k):  # tests run as root, where a read-only folder is still writable
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(tempfile, "mkstemp", denied)
    rc = cli.main(["sft", "--config", "defaults", f"model.name={tiny_model_dir}",
                   f"out_dir={tmp_path / 'ro'}"])
    err = capsys.readouterr().err
    assert rc == 2 and "cannot write there (Permission denied)" in err and "ro" in err


def test_corrupt_eval_files_in_plot_and_view(run_copy, capsys):
    before = _snapshot(run_copy / "sft")
    good = {"model": "sft", "prompt_index": 0, "completion": "a.", "length_chars": 2}
    (run_copy / "eval" / "samples.jsonl").write_text(json.dumps(good) + "\n{oops\n")
    for stage in ("plot", "view"):
        rc = cli.main([stage, "--config", "defaults", f"out_dir={run_copy}"])
        err = capsys.readouterr().err
        assert rc == 2 and "samples.jsonl: line 2 is not valid JSON" in err, err
    (run_copy / "eval" / "samples.jsonl").write_text('{"model": "sft"}\n')
    rc = cli.main(["plot", "--config", "defaults", f"out_dir={run_copy}"])
    assert rc == 2 and "line 1: missing key(s) ['length_chars']" in capsys.readouterr().err
    assert _snapshot(run_copy / "sft") == before


def test_a_bad_key_is_reported_by_the_main_process_only(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("RANK", "1")   # what `accelerate launch` sets in the second process
    assert cli.main(["sft", "sft.nope=1", f"out_dir={tmp_path}"]) == 2
    assert capsys.readouterr().err == ""
    monkeypatch.setenv("RANK", "0")
    assert cli.main(["sft", "sft.nope=1", f"out_dir={tmp_path}"]) == 2
    assert "unknown config key 'sft.nope'" in capsys.readouterr().err


def test_unreachable_hub_fails_fast_naming_the_offline_switch(tmp_path):
    env = {**__import__("os").environ, "HF_ENDPOINT": "http://127.0.0.1:9"}  # a closed port
    env.pop("HF_HUB_OFFLINE", None)
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "posttrain", "sft", "model.name=someorg/some-model",
                        f"out_dir={tmp_path}"], capture_output=True, text=True, env=env,
                       timeout=120)
    _one_error(r, "model.name='someorg/some-model'", "HF_HUB_OFFLINE=1", "127.0.0.1:9")
    assert time.perf_counter() - t0 < 40   # not the ~50 s of retries
    assert not any(tmp_path.iterdir())


# ---------------------------------------------------------------- conventions

def test_version_print_config_and_launch_files(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"posttrain {__version__}"
    # overrides on both sides of --config; the file's own values under them
    assert cli.main(["rl", "rl.beta=0.5", "--config", "demo", "--print-config",
                     "out_dir=runs/x"]) == 0
    text = capsys.readouterr().out
    assert "out_dir: runs/x" in text and "beta: 0.5" in text and "mode: online" in text
    # a bare stage means the demo, as a bare `posttrain run` does
    assert cli.main(["rl", "--print-config"]) == 0
    bare = capsys.readouterr().out
    assert cli.main(["run", "--print-config"]) == 0
    assert capsys.readouterr().out == bare and "out_dir: runs/demo" in bare
    assert cli.main(["rl", "--config", "defaults", "--print-config"]) == 0
    assert "advantage: per_token" in capsys.readouterr().out    # the reference recipe
    for name in cli.LAUNCH_FILES:
        assert cli.main(["accelerate-config", name]) == 0
        path = Path(capsys.readouterr().out.strip())
        assert path.is_file() and path.name == f"{name}.yaml"


@pytest.mark.slow
def test_eval_of_the_base_model_alone_and_its_report_path(tmp_path, args):
    out = tmp_path / "run"
    r = _cli("eval", *args(out, "eval.models=[base]"))
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"eval: report in {out / 'eval' / 'report.md'}" in r.stdout
    assert set(json.loads((out / "eval" / "report.json").read_text())["models"]) == {"base"}


# ---------------------------------------------------------------- command sequences

def test_forced_redo_with_bad_data_loses_nothing_then_redoes(run_copy, args, tmp_path):
    before = _snapshot(run_copy)
    (tmp_path / "bad.jsonl").write_text('{"prompt": "p"}\n')
    r = _cli("sft", "--force", *args(run_copy, "sft.max_lr=1e-3",
                                       f"data.train={tmp_path / 'bad.jsonl'}"))
    _one_error(r, "bad.jsonl", "missing column")
    assert _snapshot(run_copy) == before                     # nothing changed, nothing left
    assert not (run_copy / ".redo-sft").exists()
    r = _cli("sft", "--force", *args(run_copy, "sft.max_lr=1e-3"))
    assert r.returncode == 0, r.stderr[-2000:]
    after = _snapshot(run_copy)
    assert after["sft/adapter/adapter_model.safetensors"] != \
        before["sft/adapter/adapter_model.safetensors"]
    assert "max_lr: 0.001" in (run_copy / "sft" / "config.yaml").read_text()
    assert f"out_dir: {run_copy}" in (run_copy / "sft" / "config.yaml").read_text()
    # what was made from the old SFT adapter is stale: never taken as finished
    assert set(json.loads((run_copy / "stale.json").read_text())) == {"generate", "rl", "eval"}
    r = _cli("eval", *args(run_copy, "sft.max_lr=1e-3"))
    _one_error(r, "stale", "posttrain generate")   # the first of its stale inputs
    assert _snapshot(run_copy / "eval") == {k[5:]: v for k, v in after.items()
                                            if k.startswith("eval/")}
    # a plain re-run of the pipeline redoes exactly the stale stages, then all is done
    r = subprocess.run([sys.executable, "-m", "posttrain", "run", "--config", "defaults",
                        *args(run_copy, "sft.max_lr=1e-3")], capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "run: sft already done" in r.stdout and "run: rl (redo)" in r.stdout
    assert not (run_copy / "stale.json").exists()
    assert _snapshot(run_copy)["sft/adapter/adapter_model.safetensors"] == \
        after["sft/adapter/adapter_model.safetensors"]


@pytest.mark.slow
def test_a_failed_start_leaves_nothing_that_refuses_the_fix(tmp_path, args):
    out = tmp_path / "run"
    r = _cli("sft", *args(out, f"model.name={tmp_path / 'no-such-model'}"))
    _one_error(r, "no-such-model")
    assert not (out / "sft" / "config.yaml").exists() and not (out / "config.yaml").exists()
    r = _cli("sft", *args(out))
    assert r.returncode == 0, r.stderr[-2000:]
    assert (out / "sft" / "summary.json").is_file()


@pytest.mark.slow
def test_force_with_the_same_config_redoes_the_stage(run_copy, args):
    made = (run_copy / "rl" / "summary.json").stat().st_mtime_ns
    r = _cli("rl", *args(run_copy))
    assert r.returncode == 0 and "already finished" in r.stdout
    assert (run_copy / "rl" / "summary.json").stat().st_mtime_ns == made
    r = _cli("rl", "--force", *args(run_copy))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "redoing it" in r.stdout and "the redo replaced" in r.stdout
    assert (run_copy / "rl" / "summary.json").stat().st_mtime_ns > made
    assert set(json.loads((run_copy / "stale.json").read_text())) == {"eval"}


def _wait_for(cond, proc, what, limit=300):
    deadline = time.time() + limit
    while not cond():
        assert proc.poll() is None and time.time() < deadline, f"ended before {what}"
        time.sleep(0.01)


@pytest.mark.slow
def test_kill_9_during_a_forced_redo_keeps_the_old_outputs_and_resumes(run_copy, args):
    before = _snapshot(run_copy)
    cmd = [sys.executable, "-m", "posttrain", "sft", "--force", "--config", "defaults",
           *args(run_copy, "sft.max_lr=1e-3", "sft.batch_size=1")]   # 24 steps: time to kill
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpts = run_copy / ".redo-sft" / "sft" / "checkpoints"
    _wait_for(lambda: ckpts.is_dir() and len(list(ckpts.glob("step_*/state.pt"))) >= 2, proc,
              "the second checkpoint")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    now = _snapshot(run_copy)     # the killed command's lock file stays (it blocks nothing)
    assert {k: v for k, v in now.items() if not k.startswith((".redo-sft", ".lock"))} == before
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resuming the redo" in r.stdout and "resuming from" in r.stdout
    assert not (run_copy / ".redo-sft").exists()
    assert "max_lr: 0.001" in (run_copy / "sft" / "config.yaml").read_text()


@pytest.mark.slow
def test_kill_9_during_run_force_then_the_same_command_goes_on(run_copy, args):
    sft_summary = run_copy / "sft" / "summary.json"
    old_sft = sft_summary.read_bytes()
    cmd = [sys.executable, "-m", "posttrain", "run", "--force", "--config", "defaults",
           *args(run_copy)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    def sft_redone():  # SFT redone and swapped in; generate's redo is loading its model
        record = run_copy / "redo.json"
        return record.is_file() and "sft" in json.loads(record.read_text() or "{}").get(
            "served", [])
    _wait_for(sft_redone, proc, "the SFT redo")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert sft_summary.read_bytes() != old_sft
    stale = json.loads((run_copy / "stale.json").read_text())
    assert set(stale) == {"generate", "rl", "eval"}
    for stage in ("generate", "rl", "eval"):     # stale outputs are never taken as finished
        assert not pipeline.stage_done(load_config(None, args(run_copy)), stage)
    redone_sft = sft_summary.stat().st_mtime_ns
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert sft_summary.stat().st_mtime_ns == redone_sft    # not redone a second time
    assert "run: sft already done" in r.stdout
    assert not (run_copy / "stale.json").exists() and not (run_copy / "redo.json").exists()
    assert not list(run_copy.glob(".redo-*"))


class Crash(BaseException):
    """Stands for a kill -9 at one file-system step."""


@pytest.mark.slow
def test_a_crash_at_any_step_of_the_swap_loses_nothing_and_recovers(run_copy, args, tmp_path,
                                                                    monkeypatch):
    """A finished redo of SFT is swapped in with a crash at the n-th rename (every rename of
    the swap and of its atomic writes, in turn). At each crash point a usable SFT exists and
    new SFT outputs never sit beside later outputs that are not marked stale; the next
    command's recovery then completes the swap."""
    import os

    cfg = load_config(None, args(run_copy, "sft.max_lr=1e-3"))
    monkeypatch.setattr(pipeline, "_swap_in", lambda cfg, stage: None)  # leave it unswapped
    pipeline.run_stage(cfg, "sft", force=True)
    monkeypatch.undo()
    new_summary = (run_copy / ".redo-sft" / "sft" / "summary.json").read_bytes()
    old_summary = (run_copy / "sft" / "summary.json").read_bytes()
    template = tmp_path / "template"
    shutil.copytree(run_copy, template, symlinks=True)
    real_replace = os.replace
    for n in range(1, 40):
        work = tmp_path / f"crash{n}"
        shutil.copytree(template, work, symlinks=True)
        wcfg = load_config(None, args(work, "sft.max_lr=1e-3"))
        calls = []

        def replace(a, b, calls=calls, n=n):
            calls.append(a)
            if len(calls) == n:
                raise Crash()
            return real_replace(a, b)
        monkeypatch.setattr(os, "replace", replace)
        try:
            pipeline.run_stage(wcfg, "sft", force=False)  # the next command: recovery first
            crashed = False
        except Crash:
            crashed = True
        monkeypatch.setattr(os, "replace", real_replace)
        if crashed:   # the state a kill at this step leaves
            here = [p.read_bytes() for p in (work / "sft" / "summary.json",
                                             work / ".sft.old" / "summary.json",
                                             work / ".redo-sft" / "sft" / "summary.json")
                    if p.is_file()]
            assert here, f"no SFT outputs after a crash at rename {n}"
            if (work / "sft" / "summary.json").is_file() and \
                    (work / "sft" / "summary.json").read_bytes() == new_summary:
                assert {"generate", "rl", "eval"} <= set(pipeline.stale(wcfg)), n
            pipeline.run_stage(wcfg, "sft", force=False)    # recovery completes the swap
        assert (work / "sft" / "summary.json").read_bytes() == new_summary, n
        assert set(pipeline.stale(wcfg)) == {"generate", "rl", "eval"}, n
        assert not [p.name for p in work.iterdir() if p.name.startswith((".redo", ".sft"))], n
        sft_rows = [r for r in map(json.loads, (work / "metrics.jsonl").read_text().splitlines())
                    if r["stage"] == "sft"]
        assert len({r["step"] for r in sft_rows if "loss" in r}) == len(
            [r for r in sft_rows if "loss" in r]), n                 # each step once
        if not crashed:
            break
    else:
        pytest.fail("the swap never finished")
    assert n > 3 and new_summary != old_summary


# ---------------------------------------------------------------- one command per out_dir

def test_a_second_command_in_a_busy_out_dir_refuses_and_touches_nothing(tmp_path, capsys,
                                                                          tiny_model_dir):
    """While one command runs in an out_dir, another there (even --force with a changed
    config) refuses, naming the process, and changes nothing; once the first has died
    (kill -9), its lock no longer blocks."""
    out = tmp_path / "run"
    (out / ".redo-sft" / "sft").mkdir(parents=True)
    (out / ".redo-sft" / "sft" / "adapter.safetensors").write_bytes(b"half a redo")
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from posttrain.lock import out_dir_lock\n"
         f"with out_dir_lock({str(out)!r}, 'posttrain sft --force lora.rank=8'):\n"
         "    print('held', flush=True); time.sleep(600)"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        before = _snapshot(out)
        for argv in (["sft", "--force", "lora.rank=16", f"data.train={tmp_path}/no.jsonl"],
                     ["plot"], ["view"]):
            rc = cli.main([argv[0], "--config", "defaults", f"model.name={tiny_model_dir}",
                           f"out_dir={out}", *argv[1:]])
            err = capsys.readouterr().err
            assert rc == 2, err
            assert f"is in use by process {holder.pid}" in err, err
            assert "posttrain sft --force lora.rank=8" in err, err
            assert _snapshot(out) == before
    finally:
        holder.kill()
        holder.wait()
    rc = cli.main(["plot", "--config", "defaults", f"out_dir={out}"])
    err = capsys.readouterr().err
    assert rc == 2 and "nothing to plot" in err and "in use" not in err, err


# ---------------------------------------------------------------- damaged or stale run files

def _cli_in(run_dir, *argv):
    return cli.main([argv[0], "--config", "defaults", f"out_dir={run_dir}", *argv[1:]])


def test_damaged_run_files_are_one_clear_error(run_copy, args, capsys):
    """The files the error table points users at, damaged: each command names the file and
    what to do, with no traceback, and changes nothing."""
    cfg_args = [a for a in args(run_copy) if not a.startswith("out_dir=")]
    summary = run_copy / "sft" / "summary.json"
    good = summary.read_text()
    summary.write_text(good[:len(good) // 2])                # truncated
    before = _snapshot(run_copy)
    assert _cli_in(run_copy, "sft", *cfg_args) == 2
    err = capsys.readouterr().err
    assert "summary.json: not valid JSON" in err and "posttrain sft --force" in err, err
    summary.write_text(good)
    config = run_copy / "sft" / "config.yaml"
    config.write_text("model: [unclosed\n")                  # does not parse
    for stage in ("sft", "rl"):
        assert _cli_in(run_copy, stage, *cfg_args) == 2
        err = capsys.readouterr().err
        assert f"{config} cannot be read" in err and "--force" in err, err
    (run_copy / "metrics.jsonl").write_text('{"stage": "sft", "loss": 1.0}\n')
    assert _cli_in(run_copy, "plot") == 2
    err = capsys.readouterr().err
    assert "metrics.jsonl: line 1: missing key(s) ['step']" in err, err
    samples = run_copy / "eval" / "samples.jsonl"
    samples.write_text(json.dumps({"model": ["sft"], "prompt_index": 0, "completion": "a.",
                                   "length_chars": 2}) + "\n")
    for stage in ("plot", "view"):
        assert _cli_in(run_copy, stage) == 2
        err = capsys.readouterr().err
        assert "samples.jsonl: line 1: 'model' is list [\"sft\"], expected str" in err, err
    assert _snapshot(run_copy / "rl") == {k[3:]: v for k, v in before.items()
                                          if k.startswith("rl/")}


def test_plot_and_view_refuse_a_stale_eval(run_copy, capsys):
    """After a redo of an earlier stage (`posttrain sft --force` marks eval stale), plot and
    view refuse to show the old models' samples; once eval is current they run."""
    from posttrain.stages import set_stale
    cfg = load_config(None, (f"out_dir={run_copy}",))
    set_stale(cfg, {"eval": "made from the sft outputs that were redone since"})
    for stage in ("plot", "view"):
        assert _cli_in(run_copy, stage) == 2
        err = capsys.readouterr().err
        assert "is stale: made from the sft outputs" in err and "posttrain eval" in err, err
    set_stale(cfg, {})
    assert _cli_in(run_copy, "view") == 0


@pytest.mark.parametrize("error", [
    OSError(28, "No space left on device"),
    RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 1216 vs 1110"),
], ids=["ENOSPC", "torch-writer"])
def test_a_full_disk_is_one_clear_error(error, tmp_path, monkeypatch, capsys):
    """A write that fails for want of space (raw, or as torch's checkpoint writer reports
    it) names the disk's folder and says how to go on; any other error is not dressed up."""
    def full(*a, **k):
        raise error
    monkeypatch.setattr(pipeline, "run_stage", full)
    rc = cli.main(["sft", "--config", "defaults", f"out_dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err
    assert rc == 2 and "no space left on the disk that holds" in err, err
    assert str(tmp_path / "run") in err and "re-run the same command to resume" in err, err
    monkeypatch.setattr(pipeline, "run_stage", lambda *a, **k: (_ for _ in ()).throw(
        RuntimeError("something else")))
    with pytest.raises(RuntimeError, match="something else"):
        cli.main(["sft", "--config", "defaults", f"out_dir={tmp_path / 'run'}"])


def test_truncated_weights_are_one_clear_error(tiny_model_dir, tmp_path):
    """A local model whose model.safetensors was cut short (an interrupted copy or
    download): one line naming the model and what to do."""
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    r = _cli("sft", f"model.name={model}", f"out_dir={tmp_path / 'run'}")
    _one_error(r, f"model.name='{model}'", "damaged or incomplete",
               "download or copy the model again")


def test_the_lock_file_goes_with_its_command(tmp_path):
    """A finished command leaves no lock file; a file left by a killed holder does not
    block the next command, which takes it over."""
    from posttrain.lock import LOCK, out_dir_lock
    with out_dir_lock(tmp_path, "posttrain plot"):
        assert (tmp_path / LOCK).is_file()
    assert not (tmp_path / LOCK).exists()
    (tmp_path / LOCK).write_text('{"pid": 1, "command": "posttrain sft"}')   # a dead holder's
    with out_dir_lock(tmp_path, "posttrain plot"):
        assert "posttrain plot" in (tmp_path / LOCK).read_text()
    assert not (tmp_path / LOCK).exists()
