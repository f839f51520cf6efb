"""Doctests of an adapter run only where its library is installed (an optional extra)."""

import importlib.util

collect_ignore = [
    f"{name}.py" for name in ("transformers",) if importlib.util.find_spec(name) is None
]
