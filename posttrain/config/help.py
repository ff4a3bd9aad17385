"""The `posttrain <stage> --help` text: every field's key, default and docstring."""
from __future__ import annotations

import ast
import inspect
from dataclasses import fields, is_dataclass
from typing import Optional

from posttrain.config.schema import Config


def _own_field_docs(cls) -> dict:
    """The docstrings written under the fields declared in class `cls`'s own source."""
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr)
                and isinstance(getattr(nxt, "value", None), ast.Constant)
                and isinstance(nxt.value.value, str)):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def field_docs(cls) -> dict:
    """Map each field of dataclass `cls` to the docstring written under it in the source
    (over its dataclass bases too, should it have any: a subclass's docstring wins)."""
    docs = {}
    for klass in reversed(cls.__mro__):
        if "__dataclass_fields__" in vars(klass):  # a dataclass itself, not just by heritage
            docs.update(_own_field_docs(klass))
    return docs


def describe(cls=Config, prefix: str = "", sections: Optional[tuple] = None,
             values=None) -> str:
    """Every option of `cls` with its value in `values` (an instance of `cls`; None: the
    dataclass defaults), the dataclass default beside it where the two differ, and its
    docstring, for `--help`."""
    lines = []
    docs = field_docs(cls)
    defaults = cls()
    values = defaults if values is None else values
    for f in fields(cls):
        value, default = getattr(values, f.name), getattr(defaults, f.name)
        if is_dataclass(value):
            if sections is None or f.name in sections:
                lines.append(f"\n  [{prefix}{f.name}]")
                lines.append(describe(type(value), f"{prefix}{f.name}.", values=value))
            continue
        lines.append(f"  {prefix}{f.name} = {value!r}"
                     + (f"   (dataclass default: {default!r})" if value != default else ""))
        if f.name in docs:
            lines.append(f"      {docs[f.name]}")
    return "\n".join(lines)
