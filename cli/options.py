"""Option groups shared by several commands (model selection, JSON output). No heavy imports."""
from __future__ import annotations

import functools

import click


def model_options(f):
    @click.option("--model", "model", metavar="PATH", default=None,
                  help="Local Hugging Face Llama-family directory (default: the embedded SmolLM2-135M-Instruct).")
    @click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
    @click.option("--dtype", default="auto", show_default=True,
                  type=click.Choice(["auto", "float32", "bfloat16", "float16"]),
                  help="auto: bfloat16 on CUDA, float32 on CPU.")
    @functools.wraps(f)
    def wrapper(*args, model, device, dtype, **kwargs):
        from ..core.model import ModelSpec

        return f(*args, spec=ModelSpec(model, device, dtype), **kwargs)

    return wrapper


def json_option(f):
    return click.option("--json", "as_json", is_flag=True, help="Print one JSON document on stdout.")(f)


def load(spec, quiet: bool = False):
    """Load the model, telling the user when the one-time conversion runs."""
    from ..core.model import load_model
    from .render import note

    return load_model(spec, on_progress=None if quiet else note)
