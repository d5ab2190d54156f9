"""The launcher preamble: a user error is one line naming the problem and exit status 2, not a traceback."""
import pathlib
import subprocess
import sys

import pytest

from launch import common

REPO = pathlib.Path(__file__).resolve().parents[2]


def _run(monkeypatch, capsys, main, env=None):
    monkeypatch.setattr(sys, "argv", ["prog"])
    for key, value in (env or {}).items():
        monkeypatch.setenv(key, value)
    with pytest.raises(SystemExit) as exit_info:
        common.run(main)
    return exit_info.value.code, capsys.readouterr().err


@pytest.mark.parametrize("error", [ValueError("--config.steps must be >= 1, got 0"),
                                   FileNotFoundError("no such file: /nope/data.jsonl"),
                                   KeyError("unknown preset 'llama9'"),
                                   NotADirectoryError("workdir /tmp/x is a file")])
def test_user_error_is_one_line_and_status_2(monkeypatch, capsys, error):
    def main(argv):
        raise error

    code, err = _run(monkeypatch, capsys, main)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err
    message = error.args[0]
    assert lines[0].startswith(f"error: {type(error).__name__}: {message}")


def test_traceback_on_request_and_for_bugs(monkeypatch, capsys):
    def main(argv):
        raise ValueError("bad value 7")

    monkeypatch.setattr(sys, "argv", ["prog"])
    monkeypatch.setenv("JAXLLM_TRACEBACK", "1")
    with pytest.raises(ValueError, match="bad value 7"):
        common.run(main)

    def buggy(argv):
        raise ZeroDivisionError("a bug, not a user error")

    monkeypatch.delenv("JAXLLM_TRACEBACK")
    with pytest.raises(ZeroDivisionError):
        common.run(buggy)


def test_success_returns_normally(monkeypatch, capsys):
    code, err = _run(monkeypatch, capsys, lambda argv: None)
    assert code in (0, None) and err == ""  # sys.exit(None) is status 0


def test_flag_errors_are_one_line(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["prog", "--nosuchflag=1"])
    with pytest.raises(SystemExit) as exit_info:
        common.run(lambda argv: None)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and len(err.strip().splitlines()) == 1 and "nosuchflag" in err



def test_importing_a_launcher_for_its_functions_defines_no_flags():
    """Tests and experiments import these launchers for their functions; a flag defined (and marked
    required) at import would make every later `common.run` in the same process fail. A fresh
    interpreter, since this one may have imported them already."""
    modules = ["launch.export_hf", "launch.extend_context", "launch.serve"]
    code = ("from absl import flags; import importlib\n"
            f"for m in {modules!r}: importlib.import_module(m)\n"
            "ours = {m: [f.name for f in fs] for m, fs in flags.FLAGS.flags_by_module_dict().items()\n"
            "        if m.startswith('launch')}\n"
            "assert not ours, f'flags defined at import: {ours}'")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr[-2000:]
