"""``import nbattr`` is the engine alone: the widget's packages load on first use of ``nbattr.Explain``
(a script, a torchrun worker or a GPU server without Jupyter needs neither anywidget nor ipywidgets)."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def _run(code: str) -> str:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          check=True, timeout=120).stdout


def test_the_engine_imports_without_the_widget():
    out = _run("""
        import sys, nbattr
        print(sorted(m for m in ("anywidget", "ipywidgets", "nbattr.widget") if m in sys.modules))
        from nbattr import Explain
        print(Explain.__module__, "anywidget" in sys.modules)
    """)
    assert out.splitlines() == ["[]", "nbattr.widget.explain True"]


def test_the_engine_works_where_anywidget_is_not_installed():
    out = _run("""
        import sys
        sys.modules["anywidget"] = None  # as if it were not installed
        import torch, nbattr
        r = nbattr.attribute(lambda x: (x ** 2).sum(1), torch.ones(2, 3), method="saliency")
        print(r.attributions.tolist())
        try:
            nbattr.Explain
        except ImportError as e:
            print("ImportError", "anywidget" in str(e))
        try:
            nbattr.nothing
        except AttributeError as e:
            print("AttributeError", e)
    """)
    assert out.splitlines() == ["[[2.0, 2.0, 2.0], [2.0, 2.0, 2.0]]", "ImportError True",
                                "AttributeError module 'nbattr' has no attribute 'nothing'"]
