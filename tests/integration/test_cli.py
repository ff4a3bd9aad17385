import subprocess
import sys


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "posttrain", *args], capture_output=True,
                          text=True, timeout=120)


def test_help_lists_stages_and_options():
    top = run_cli("--help")
    assert top.returncode == 0 and "sft" in top.stdout
    sft = run_cli("sft", "--help")
    assert sft.returncode == 0
    assert "sft.max_lr" in sft.stdout and "Peak learning rate" in sft.stdout
    assert "lora.rank" in sft.stdout
    gen = run_cli("generate", "--help")
    assert gen.returncode == 0 and "generate.samples_per_prompt" in gen.stdout
    rl = run_cli("rl", "--help")
    assert rl.returncode == 0 and "rl.clip_eps" in rl.stdout and "reward.name" in rl.stdout


def test_bad_override_exits_nonzero_naming_the_key(tmp_path):
    r = run_cli("sft", f"out_dir={tmp_path}", "sft.learning_rate=1")
    assert r.returncode == 2
    assert "sft.learning_rate" in r.stderr
    assert not (tmp_path / "config.yaml").exists()


def test_bad_data_file_exits_nonzero_naming_the_file(tmp_path):
    r = run_cli("sft", f"out_dir={tmp_path / 'run'}", f"data.train={tmp_path / 'nope.jsonl'}")
    assert r.returncode == 2
    assert "nope.jsonl" in r.stderr and "not found" in r.stderr


def test_help_shows_the_values_a_bare_command_runs_with():
    """--help shows the demo config's values (what a command without --config uses, as
    --print-config prints them), with the dataclass default beside each that differs."""
    import yaml
    help_text = run_cli("rl", "--help").stdout
    printed = yaml.safe_load(run_cli("rl", "--print-config").stdout)
    assert "out_dir = 'runs/demo'   (dataclass default: 'runs/default')" in help_text
    for key in ("mode", "max_lr", "beta", "advantage"):
        line = next(x for x in help_text.splitlines() if x.startswith(f"  rl.{key} = "))
        assert line.split(" = ")[1].split("   (")[0] == repr(printed["rl"][key]), line
        assert "(dataclass default: " in line
    assert "  rl.clip_eps = 0.3\n" in help_text    # the same in both: no note
