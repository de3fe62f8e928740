"""One place for CLI errors: every command's exceptions become one line ``timm-acsi CMD: error: ...`` with exit
code 2 (bad input) or 1 (a failure of the Hub, the network or the disk); bugs keep their traceback."""

import errno
import importlib
import inspect
import runpy
import sys
from pathlib import Path
from types import ModuleType

import pytest

from timm_acsi import cli
from timm_acsi.data import UnreadableImageError
from timm_acsi.extras import MissingExtraError, import_extra
from timm_acsi.inference import HaarFaceDetector
from timm_acsi.inference.video import open_video
from timm_acsi.train import RunError


@pytest.mark.parametrize(
    "error, code",
    [
        (ValueError("bad value"), 2),
        (FileNotFoundError("no such file"), 2),
        (FileExistsError("occupied"), 2),
        (PermissionError("denied"), 2),
        (IsADirectoryError("a folder"), 2),
        (RunError("rank 0 refused the run folder"), 2),
        (UnreadableImageError("x.png is not an image"), 2),
        (MissingExtraError("onnx", "onnx", "ONNX export"), 2),
        (ConnectionError("Hub unreachable"), 1),
        (OSError(errno.ENOSPC, "No space left on device"), 1),
        (KeyError("bug"), None),
        (TypeError("bug"), None),
    ],
)
def test_exit_codes(error, code):
    assert cli.exit_code(error) == code


@pytest.fixture
def fake_command(monkeypatch):
    """A ``timm-acsi fake`` command whose main raises what the test puts in ``module.error``."""
    module = ModuleType("timm_acsi.cli._fake")

    def main(argv, prog="timm-acsi fake"):
        raise module.error

    module.main = main
    monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.setitem(cli.COMMANDS, "fake", ("_fake", "a test command"))
    return module


def test_run_command_prints_one_line_and_returns_the_code(fake_command, capsys):
    fake_command.error = ValueError("no dataset at /data:\n  pass --data ROOT")
    assert cli.main(["fake"]) == 2
    assert capsys.readouterr().err == "timm-acsi fake: error: no dataset at /data: pass --data ROOT\n"
    fake_command.error = ConnectionError("Could not reach the Hub")
    assert cli.main(["fake"]) == 1
    assert capsys.readouterr().err == "timm-acsi fake: error: Could not reach the Hub\n"


def test_bugs_keep_their_traceback(fake_command):
    fake_command.error = KeyError("missing")
    with pytest.raises(KeyError):
        cli.main(["fake"])


def test_unknown_command(capsys):
    assert cli.main(["trian"]) == 2
    assert capsys.readouterr().err.startswith("timm-acsi: error: unknown command 'trian'")


def test_every_command_has_the_same_main_signature():
    for name, (module_name, _) in cli.COMMANDS.items():
        main = importlib.import_module(f"timm_acsi.cli.{module_name}").main
        params = list(inspect.signature(main).parameters.values())
        assert [p.name for p in params] == ["argv", "prog"], name
        assert params[1].default == f"timm-acsi {name}", name


@pytest.mark.parametrize("command", ["evaluate", "profile"])
def test_img_size_is_spelled_the_same_everywhere(command, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main([command, "--help"])
    assert info.value.code == 0 and "--img-size" in capsys.readouterr().out


def test_a_failed_parity_check_is_a_failure_not_bad_input():
    """ParityError is a ValueError (exit 2 by the rule for bad input), but a wrong export is the tool's failure."""
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from timm_acsi.export.export import ParityError

    assert cli.exit_code(ParityError("onnxruntime does not reproduce acsinet18", report=None)) == 1


def test_import_extra_names_the_extra_that_installs_a_missing_module(monkeypatch):
    assert import_extra("json", "onnx", "ONNX export") is sys.modules["json"]
    monkeypatch.setitem(sys.modules, "onnx", None)  # any import of it now fails
    with pytest.raises(MissingExtraError) as info:
        import_extra("onnx", "onnx", "ONNX export")
    assert str(info.value) == 'ONNX export needs onnx, which is not installed: pip install "timm-acsi[onnx]"'
    assert info.value.name == "onnx" and isinstance(info.value.__cause__, ImportError)


@pytest.mark.parametrize(
    "call, message",
    [
        (
            lambda: open_video("clip.avi"),
            'Reading videos needs cv2, which is not installed: pip install "timm-acsi[predict]"',
        ),
        (
            lambda: HaarFaceDetector(),
            "Face detection with OpenCV's Haar cascade needs cv2, which is not installed: "
            'pip install "timm-acsi[predict]"',
        ),
    ],
)
def test_library_code_names_the_extra_too(call, message, monkeypatch):
    """Library functions that need OpenCV raise the same error as the commands (exit code 2)."""
    monkeypatch.setitem(sys.modules, "cv2", None)
    with pytest.raises(MissingExtraError) as info:
        call()
    assert str(info.value) == message and cli.exit_code(info.value) == 2


def test_run_command_names_the_script_that_runs_it(fake_command, capsys):
    fake_command.error = FileExistsError("table.md exists: pass --overwrite")
    assert cli.run_command("fake", [], prog="benchmarks/fake.py") == 2
    assert capsys.readouterr().err == "benchmarks/fake.py: error: table.md exists: pass --overwrite\n"


def test_profile_benchmark_errors_are_one_line(monkeypatch, capsys):
    """benchmarks/profile_flops.py is ``timm-acsi profile`` under its own name, errors included."""
    script = Path(__file__).parents[1] / "benchmarks" / "profile_flops.py"
    monkeypatch.setattr(sys, "argv", [str(script), "--models", "nope"])
    with pytest.raises(SystemExit) as info:
        runpy.run_path(str(script), run_name="__main__")
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("benchmarks/profile_flops.py: error: Unknown model 'nope'") and err.count("\n") == 1
