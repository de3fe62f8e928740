"""torch.hub entry points (``hubconf.py``) and the import cost of ``timm_acsi``.

The hub and import checks run in a clean interpreter (subprocess, cwd a temp dir) so that nothing this test
session imported can hide a missing import.
"""

import configparser
import importlib.util
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from types import ModuleType

import pytest
import timm
import torch

import timm_acsi  # noqa: F401  (registers the models)

REPO = Path(__file__).resolve().parents[1]
MODEL_NAMES = timm.list_models(["coresnet*", "acsinet*"])


def _run_clean(code: str, tmp_path: Path) -> str:
    """Run ``code`` in a fresh interpreter, cwd ``tmp_path``, offline; return its stdout."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TORCH_HOME=str(tmp_path / "torch_home"), PYTHONPATH="")
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


@pytest.fixture(scope="module")
def hubconf() -> ModuleType:
    """hubconf.py imported the way torch.hub does (by file path, as module ``hubconf``)."""
    spec = importlib.util.spec_from_file_location("hubconf", REPO / "hubconf.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_hub_load_local_in_clean_interpreter(tmp_path):
    out = _run_clean(
        f"""
        import json, sys
        import torch
        assert "timm_acsi" not in sys.modules
        model = torch.hub.load({str(REPO)!r}, "acsinet18", source="local", num_classes=7)
        x = torch.randn(1, 3, 64, 64)
        with torch.no_grad():
            y = model.eval()(x)
        trained = torch.hub.load({str(REPO)!r}, "acsinet18", source="local", pretrained=True).eval()
        import timm
        reference = timm.create_model("acsinet18.fer2013", pretrained=True).eval()
        face = torch.randn(1, 3, 48, 48, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            same = torch.equal(trained(face), reference(face))
        print(json.dumps(dict(
            params=sum(p.numel() for p in model.parameters()),
            cls=type(model).__name__,
            num_classes=model.num_classes,
            out=list(y.shape),
            tag=model.pretrained_cfg["tag"],
            grayscale=model.grayscale,
            trained=[
                trained.pretrained_cfg["tag"], trained.grayscale, list(trained.pretrained_cfg["input_size"]), same
            ],
        )))
        """,
        tmp_path,
    )
    result = json.loads(out.strip().splitlines()[-1])
    # untrained, the model carries its default tag's preprocessing (48 px grayscale faces), as timm models do
    assert result == dict(
        params=11_275_527,
        cls="CoResNet",
        num_classes=7,
        out=[1, 7],
        tag="fer2013",
        grayscale=True,
        trained=["fer2013", True, [3, 48, 48], True],  # the shipped weights, loaded offline through torch.hub
    )
    assert not (tmp_path / "torch_home" / "hub" / "checkpoints").exists()  # nothing downloaded


def test_every_registered_model_has_an_entry_point(hubconf):
    """torch.hub lists every public callable of hubconf as an entry point (torch.hub.list's rule)."""
    entrypoints = sorted(n for n in dir(hubconf) if callable(getattr(hubconf, n)) and not n.startswith("_"))
    extra = sorted(set(entrypoints) - set(MODEL_NAMES))
    assert not extra, f"hubconf exposes non-model callables as hub entry points: {extra}"
    assert entrypoints == MODEL_NAMES


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_entry_point_builds_the_model(hubconf, name):
    entry = getattr(hubconf, name)
    assert entry.__name__ == name
    model = entry(num_classes=7, attn_placement="stage", device="meta")
    ref = timm.create_model(name, num_classes=7, attn_placement="stage", device="meta")
    assert type(model) is type(ref)
    assert model.pretrained_cfg["architecture"] == name
    assert model.num_classes == 7
    shapes = [(n, p.shape) for n, p in model.named_parameters()]
    assert shapes == [(n, p.shape) for n, p in ref.named_parameters()]


def test_entry_point_passes_pretrained(hubconf):
    with pytest.raises(RuntimeError, match=r"No weights are published for acsinet18\.rafdb"):
        hubconf.acsinet18(pretrained=True, pretrained_cfg="rafdb")


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_entry_point_docstrings(hubconf, name):
    doc = getattr(hubconf, name).__doc__
    assert doc and doc.strip()
    registered = timm.models.model_entrypoint(name).__doc__.strip().splitlines()[0]
    assert doc.strip().splitlines()[0] == registered
    assert f"timm.create_model({name!r}, pretrained=pretrained, **kwargs)" in doc


def test_module_docstring_and_dependencies(hubconf):
    assert hubconf.__doc__ and "torch.hub.load" in hubconf.__doc__
    deps = hubconf.dependencies
    assert isinstance(deps, list) and {"torch", "timm"} <= set(deps)
    # torch.hub refuses to load when one is missing: each must be importable, and a declared install requirement
    assert all(importlib.util.find_spec(d) is not None for d in deps)
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    requires = {re.split(r"[<>=!~\[; ]", r.strip())[0] for r in cfg["options"]["install_requires"].split("\n") if r}
    assert set(deps) <= requires


def test_import_is_light(tmp_path):
    """``import timm_acsi`` adds nothing but its own modules to what timm imports (no fvcore, matplotlib, CLI)."""
    out = _run_clean(
        """
        import json, sys
        import timm
        before = set(sys.modules)
        import timm_acsi
        print(json.dumps(dict(
            new=sorted(set(sys.modules) - before),
            timm_imports_fvcore="fvcore" in before,
            loaded=[m for m in ("fvcore", "matplotlib", "iopath", "timm_acsi.cli", "timm_acsi.checkpoint")
                    if m in sys.modules],
        )))
        """,
        tmp_path,
    )
    result = json.loads(out.strip().splitlines()[-1])
    assert not result["timm_imports_fvcore"]
    assert result["new"] and all(m == "timm_acsi" or m.startswith("timm_acsi.") for m in result["new"]), result["new"]
    assert not result["loaded"]
    assert "timm_acsi.models.coresnet" in result["new"]


def test_hub_and_timm_give_same_weights_layout(hubconf):
    model = hubconf.coresnet18(num_classes=1000, device="meta")
    ref = timm.create_model("resnet18", device="meta")
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    assert isinstance(model, torch.nn.Module)
