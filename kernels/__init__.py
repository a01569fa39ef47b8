"""GPU and reference kernels, importable as ``headscope.kernels``.

In a checkout, the repository root is on ``sys.path`` whenever Python starts there (``python -m pytest``,
``python -c``, a REPL), and this folder would then also be found as a top-level ``kernels``: it would
shadow Hugging Face's ``kernels`` package, which transformers (>= 5.25, where it is a dependency) imports
at start-up. Imported under that name, this module hands the import over to the installed package
(with none installed it stays an empty module, as transformers' availability check expects).
"""

if __name__ == "kernels":
    import importlib.machinery
    import importlib.util
    import os
    import sys

    _root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _spec = importlib.machinery.PathFinder.find_spec("kernels", [p for p in sys.path if os.path.abspath(p or os.curdir) != _root])
    if _spec is not None:
        _module = importlib.util.module_from_spec(_spec)
        sys.modules["kernels"] = _module  # the import statement returns what sys.modules holds once this module has run
        _spec.loader.exec_module(_module)
