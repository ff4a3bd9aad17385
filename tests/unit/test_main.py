"""`python -m posttrain` runs the CLI; importing posttrain.__main__ (as vLLM's spawned workers
re-import a main module) does not."""
import importlib
import sys

import pytest


def test_importing_the_main_module_runs_nothing(monkeypatch):
    import posttrain.cli
    calls = []
    monkeypatch.setattr(posttrain.cli, "main", lambda *a, **k: calls.append(a) or 0)
    monkeypatch.delitem(sys.modules, "posttrain.__main__", raising=False)
    importlib.import_module("posttrain.__main__")
    assert calls == []


def test_running_it_as_main_runs_the_cli(monkeypatch):
    import runpy

    import posttrain.cli
    monkeypatch.setattr(posttrain.cli, "main", lambda *a, **k: 7)
    monkeypatch.delitem(sys.modules, "posttrain.__main__", raising=False)
    with pytest.raises(SystemExit) as done:
        runpy.run_module("posttrain", run_name="__main__")
    assert done.value.code == 7
