"""The package's source: nothing loads pickles or remote code by default."""
import re
import sys
from pathlib import Path

from posttrain.model.load import load_base_model


def test_no_pickle_loads_or_remote_code_by_default():
    """Every torch.load passes weights_only=True; weights load from safetensors; model code
    from the Hub runs only when model.trust_remote_code is set."""
    import posttrain
    from posttrain.config import Config
    assert Config().model.trust_remote_code is False
    src = Path(posttrain.__file__).parent
    loads = {}                                             # file -> the torch.load calls in it
    for f in sorted(src.rglob("*.py")):                    # subpackages included
        name = f.relative_to(src).as_posix()
        text = f.read_text()
        for call in re.findall(r"torch\.load\(.*", text):
            assert "weights_only=True" in call, f"{name}: {call}"
            loads.setdefault(name, []).append(call)
        assert "trust_remote_code=True" not in text, name
        assert "pickle" not in text, name
    # the scan reached the checkpoint loader inside a subpackage (the call the rule is for)
    assert "train/checkpoint.py" in loads, sorted(loads)
    loader = sys.modules[load_base_model.__module__]   # wherever the loading lives
    assert "use_safetensors=True" in Path(loader.__file__).read_text()
