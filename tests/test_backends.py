"""The backend registry: every backend declares everything about itself in its own module, and
the rest of qconvert (--help, release plans, cards, validation) reads those declarations."""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from conftest import REPO_ROOT
from qconvert.convert import BACKENDS, CLI_OPTIONS, OPTIONS, SCHEMES
from qconvert.convert.base import CONTAINERS, PIPELINE_FOLDER, Backend

REGISTERED = sorted(BACKENDS.items())
# One cheap conversion per backend, whose card is rendered once per scheme.
CARD_CONVERSIONS = {"torchao": ("int8wo", {}), "bnb": ("nf4", {}), "gguf": ("Q8_0", {"layout": "diffusers"}),
                    "quanto": ("int8", {}), "fp8": ("e4m3fn", {}), "sdnq": ("int8", {})}


def _overrides(cls: type, hook: str) -> bool:
    return getattr(cls, hook) is not getattr(Backend, hook)


@pytest.mark.parametrize("name,cls", REGISTERED)
def test_every_backend_declares_itself(name, cls):
    assert issubclass(cls, Backend) and cls.name == name
    assert cls.schemes and all(isinstance(t, str) and t.strip() and "\n" not in t for t in cls.schemes.values())
    assert "jobs" in cls.accepted_options and set(cls.cli_flags) <= set(cls.accepted_options)
    assert cls.import_names and cls.pip_package and cls.version_packages
    assert isinstance(cls.pin_version, bool)
    assert cls.warm_up_modules
    assert cls.container in CONTAINERS
    assert cls.hub_library_name and cls.card_loader
    if cls.container != PIPELINE_FOLDER:  # the shared layer writes only pipeline folders
        assert _overrides(cls, "write_output")
    # the derived tables
    assert SCHEMES[name] == tuple(cls.schemes) and OPTIONS[name] == cls.accepted_options
    assert set(cls.cli_flags) <= CLI_OPTIONS


@pytest.mark.parametrize("name,cls", REGISTERED)
def test_every_backend_has_an_extra_and_thresholds(name, cls):
    pyproject = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    extras = pyproject["project"]["optional-dependencies"]
    assert cls.extra in extras, f"add [project.optional-dependencies] {cls.extra} to pyproject.toml"
    assert any(cls.pip_package in dep for dep in extras[cls.extra])
    thresholds = tomllib.loads((REPO_ROOT / "qconvert" / "validate" / "thresholds.toml").read_text())
    assert set(thresholds.get(name, {})) == set(cls.schemes), "one [backend.scheme] table per scheme"


@pytest.mark.parametrize("name,cls", REGISTERED)
def test_importing_a_backend_module_imports_no_dependency(name, cls):
    code = (
        "import builtins, importlib, sys\n"
        "real = builtins.__import__\n"
        "blocked = {'torch', 'numpy', 'huggingface_hub', 'diffusers', 'transformers', 'safetensors', 'gguf',\n"
        "           'torchao', 'bitsandbytes', 'accelerate', 'tqdm', 'PIL', 'click'}\n"
        "def guarded(name, globals=None, locals=None, fromlist=(), level=0):\n"
        "    if level == 0 and name.split('.')[0] in blocked:  # not qconvert's own convert.gguf\n"
        "        raise ImportError(f'{name} imported at module level')\n"
        "    return real(name, globals, locals, fromlist, level)\n"
        "builtins.__import__ = guarded\n"
        f"importlib.import_module({cls.__module__!r})\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in blocked))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_flux_help_lists_every_scheme_with_its_text():
    from click.testing import CliRunner

    from qconvert.cli import cli

    result = CliRunner().invoke(cli, ["flux", "--help"], terminal_width=200)
    assert result.exit_code == 0, result.output
    help_text = " ".join(result.output.split())
    for name, cls in REGISTERED:
        assert f"--backend {name}" in help_text
        for scheme, text in cls.schemes.items():
            assert f"{scheme} {' '.join(text.split())}" in help_text


@pytest.mark.parametrize("name,cls", REGISTERED)
def test_the_plan_shows_the_scheme_text(name, cls, source):
    from qconvert.convert import get_backend, make_plan

    scheme, options = CARD_CONVERSIONS[name]
    plan, _ = make_plan(source, get_backend(name, scheme, **options), ("transformer",))
    assert f"{scheme}: {cls.schemes[scheme]}" in plan.render()
    assert plan.layout == cls.container


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> dict[str, Path]:
    from qconvert.convert import convert
    from qconvert.sources import resolve_source

    source = resolve_source("tiny-flux")
    outs = {}
    for name, (scheme, options) in CARD_CONVERSIONS.items():
        out = tmp_path_factory.mktemp("backends") / f"{name}-{scheme}"
        convert(source, name, scheme, out, components=("transformer",), progress=False, options=options or None)
        outs[name] = out
    return outs


def test_card_conversions_cover_the_registry():
    assert set(CARD_CONVERSIONS) == set(BACKENDS), "add a cheap conversion of the new backend"


@pytest.mark.parametrize("name,cls", REGISTERED)
def test_cards_take_scheme_text_and_usage_from_the_backend(name, cls, converted, tmp_path):
    from qconvert.cards import card_text, extract_usage

    out = tmp_path / "out"
    shutil.copytree(converted[name], out)
    manifest = json.loads((out / "qconvert.json").read_text())
    for scheme, text in cls.schemes.items():
        relabelled = copy.deepcopy(manifest)
        relabelled["scheme"] = scheme
        (out / "qconvert.json").write_text(json.dumps(relabelled))
        card = card_text(out)
        assert text in card and f"--scheme {scheme}" in card
        assert cls.card_method(relabelled) in card
    for key, value in manifest["options"].items():  # the reproduce command names the backend's flags
        if key in cls.cli_flags:
            assert f"--{key.replace('_', '-')} {value}" in card
    usage = extract_usage(card)
    assert "pipe = " in usage and "pipe(" in usage
    library = card.split("library_name: ", 1)[1].split("\n", 1)[0]
    assert library == cls.hub_library_name


def test_model_facts_are_cached_as_built_and_keyed_by_config(source, tmp_path, monkeypatch):
    from dataclasses import replace

    from qconvert.convert import base

    monkeypatch.setenv("QCONVERT_CACHE", str(tmp_path))
    comp = source.components["transformer"]
    built = base.build_model_facts(comp)
    assert built.linear_weights and built.shapes
    assert base.model_facts(comp) == built  # built, then written
    (entry,) = (tmp_path / "facts").glob("*.json")
    with monkeypatch.context() as m:
        m.setattr(base, "build_model_facts", lambda c: pytest.fail("built although cached"))
        assert base.model_facts(comp) == built
    entry.write_text('{"linear_weights": [')  # a torn or foreign entry: built again, rewritten
    assert base.model_facts(comp) == built and base._read_facts(entry) == built
    other = replace(comp, config={**comp.config, "num_layers": comp.config["num_layers"] + 1})
    bigger = base.model_facts(other)
    assert len(list((tmp_path / "facts").glob("*.json"))) == 2
    assert len(bigger.linear_weights) > len(built.linear_weights)
