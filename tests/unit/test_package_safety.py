"""The package's source: nothing loads pickles or remote code by default."""
import re
import sys
from pathlib import Path

from posttrain import modeling


def test_no_pickle_loads_or_remote_code_by_default():
    """Every torch.load passes weights_only=True; weights load from safetensors; model code
    from the Hub runs only when model.trust_remote_code is set."""
    import posttrain
    from posttrain.config import Config
    assert Config().model.trust_remote_code is False
    src = Path(posttrain.__file__).parent
    scanned = []
    for f in sorted(src.rglob("*.py")):                    # subpackages included
        name = f.relative_to(src).as_posix()
        text = f.read_text()
        for call in re.findall(r"torch\.load\(.*", text):
            assert "weights_only=True" in call, f"{name}: {call}"
        assert "trust_remote_code=True" not in text, name
        assert "pickle" not in text, name
        scanned.append(f)
    assert len(scanned) == len(list(src.rglob("*.py"))) > 0
    if any(d.is_dir() and any(d.rglob("*.py")) for d in src.iterdir()):   # subpackages exist
        assert any(f.parent != src for f in scanned), "no file inside a subpackage was scanned"
    loader = sys.modules[modeling.load_base_model.__module__]   # wherever the loading lives
    assert "use_safetensors=True" in Path(loader.__file__).read_text()
