"""Keep third-party chatter off the terminal without importing the libraries to do it.

diffusers, transformers and torch take ~3 s to import; a command that fails on its input, or a
conversion that never needs diffusers, should not pay that to silence them. Each setting is
applied by a post-import hook (``wrapt``), when and if the library's module is first imported;
a module already imported gets it at once.
"""

from __future__ import annotations

import functools
import logging
import os
import warnings
from types import ModuleType

# Loggers of the libraries qconvert drives. A logger without handlers prints WARNING and above
# through logging's last-resort handler: bitsandbytes ("Failed to load CPU gemm_4bit_forward
# from kernels-community", logged when its CPU backend is imported, which diffusers and
# transformers do for every command; "MatMul8bitLt: inputs will be cast" per 8-bit layer call)
# and torchao ("Failed to load .../_C_mxfp8...so" for kernels built for other devices, at import).
LIBRARY_LOGGERS = ("bitsandbytes", "torchao", "torch", "transformers", "diffusers", "accelerate", "huggingface_hub")


def quiet_libraries(verbose: int) -> None:
    """Library warnings, log records below ERROR and progress bars off; -vv shows them all."""
    if verbose >= 2:
        from .validate import show_library_progress

        show_library_progress(True)
        return
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    warnings.filterwarnings("ignore")
    _logger_levels()
    _install_hooks()


@functools.cache  # once per process: a hook registered twice would run twice
def _install_hooks() -> None:
    import wrapt  # here, not at the top: `qconvert --help` imports this module

    # torch configures its own loggers when it is imported: set the levels again after it.
    wrapt.register_post_import_hook(lambda _m: _logger_levels(), "torch")
    wrapt.register_post_import_hook(_no_progress_bar, "diffusers.utils.logging")
    wrapt.register_post_import_hook(_no_progress_bar, "transformers.utils.logging")
    wrapt.register_post_import_hook(_no_gguf_loading_bar, "transformers.modeling_gguf_pytorch_utils")


def _logger_levels() -> None:
    for name in LIBRARY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


def _no_progress_bar(library_logging: ModuleType) -> None:
    """The libraries' own bars (loading weights, pipeline components)."""
    library_logging.disable_progress_bar()


def _no_gguf_loading_bar(gguf_loader: ModuleType) -> None:
    """transformers' GGUF loader (T5 from a .gguf file) draws a plain tqdm bar, "Converting and
    de-quantizing GGUF tensors", which disable_progress_bar() does not reach: give that module a
    tqdm that starts disabled."""
    bar = getattr(gguf_loader, "tqdm", None)
    if bar is not None and not isinstance(bar, functools.partial):
        gguf_loader.tqdm = functools.partial(bar, disable=True)
