"""Make ``AutoModelForCausalLM.from_pretrained(hybrid_dir)`` work after a plain ``import headscope``.

transformers finds a model through its Auto tables, keyed by the ``model_type`` in config.json; a
package adds its own model by calling ``AutoConfig.register`` / ``AutoModelForCausalLM.register`` (what
``import fla`` does for its models). Doing that at ``import headscope`` would load transformers' config
and model code, seconds that ``import headscope`` (torch only) and most of the CLI never need. So the
registration waits for transformers:

* when ``transformers.models.auto.configuration_auto`` (the AutoConfig table) is imported, by the user
  or by headscope, ``headscope.hybrid.configuration`` (the config only, no model code) is imported and
  registers ``HybridConfig`` with it; if that table is already imported, this happens at once;
* ``HybridForCausalLM`` joins ``AutoModelForCausalLM`` when ``headscope.hybrid.modeling`` is imported,
  which creating a ``HybridConfig`` does. ``AutoModelForCausalLM.from_pretrained`` always reads the
  config before it looks the model class up, so the class is there in time.

The wait is a finder at the front of ``sys.meta_path`` that answers for that one module name only: it
takes the spec the other finders give and runs the registration right after the module has executed.
A registration that fails (an incompatible transformers) is a warning, never a failed transformers import.
"""

from __future__ import annotations

import importlib
import importlib.abc
import sys
import warnings

AUTO_CONFIG_MODULE = "transformers.models.auto.configuration_auto"


def register_config() -> None:
    """Add ``HybridConfig`` to transformers' AutoConfig table (model_type ``headscope_hybrid``).

    ``headscope.hybrid.configuration`` registers itself when its import finishes; when that import is what
    loads the AutoConfig table, this call finds it half-initialised in ``sys.modules`` and leaves it be.
    """
    try:
        importlib.import_module("headscope.hybrid.configuration")
    except Exception as err:  # a registration problem must not break the user's transformers import
        warnings.warn(f"headscope could not register its hybrid with transformers' AutoConfig: {err}", stacklevel=2)


class _RegisterAfterImport(importlib.abc.MetaPathFinder):
    """Runs ``register_config`` right after ``AUTO_CONFIG_MODULE`` executes (module docstring)."""

    def find_spec(self, fullname, path, target=None):
        if fullname != AUTO_CONFIG_MODULE:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        execute = spec.loader.exec_module  # this spec's own loader instance

        def exec_module(module) -> None:
            execute(module)
            register_config()

        spec.loader.exec_module = exec_module
        return spec


def install() -> None:
    """Register now if transformers' AutoConfig table is loaded, else when it is (idempotent)."""
    if AUTO_CONFIG_MODULE in sys.modules:
        register_config()
    elif not any(isinstance(finder, _RegisterAfterImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterImport())
