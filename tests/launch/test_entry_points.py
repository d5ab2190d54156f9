"""Every entry point, given bad input as a new user would, ends with one clear line naming the
problem and a non-zero exit status: no traceback.

Each case runs the real command in a subprocess (a JAX import each), hence slow; the in-process
behaviour of `launch.common.run` is tested in test_common.py.
"""
import os
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]
PRETRAIN = "--config=experiments/pretrain/config.py"
CPO = "--config=experiments/cpo/trainer_config.py"


def _cases(tmp: pathlib.Path):
    """(name, argv, fragment the output must contain)."""
    a_file = tmp / "a_file"
    a_file.write_text("not a folder\n")
    bad_jsonl = tmp / "pairs.jsonl"
    bad_jsonl.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\nthis is not json\n')
    empty = tmp / "empty.jsonl"
    empty.write_text("")
    work = str(tmp / "work")
    return [
        ("misspelt config field", ["launch.train", PRETRAIN, f"--workdir={work}", "--config.stepz=3"], "stepz"),
        ("mistyped config field", ["launch.train", PRETRAIN, f"--workdir={work}", "--config.steps=many"], "many"),
        ("missing required flag", ["launch.train", PRETRAIN], "workdir"),
        ("missing config file", ["launch.train", "--config=/nonexistent/config.py", f"--workdir={work}"],
         "/nonexistent/config.py"),
        ("unknown preset", ["launch.train", PRETRAIN, f"--workdir={work}", "--config.model.preset=llama9"], "llama9"),
        ("workdir is a file", ["launch.train", PRETRAIN, f"--workdir={a_file}"], str(a_file)),
        ("mesh does not fit", ["launch.train", PRETRAIN, f"--workdir={work}", "--config.mesh=fsdp:3"], "fsdp:3"),
        ("non-JSON line", ["launch.train_preference", CPO, f"--workdir={work}", "--config.data.source=jsonl",
                           f"--config.data.files={bad_jsonl}"], f"{bad_jsonl}:2"),
        ("empty input file", ["launch.train_preference", CPO, f"--workdir={work}", "--config.data.source=jsonl",
                              f"--config.data.files={empty}"], str(empty)),
        ("missing model source", ["launch.serve", "--source=/nonexistent/model"], "/nonexistent/model"),
        ("proxy alpha not finite", ["launch.serve", "--source=/nonexistent/model", "--expert=/e", "--anti_expert=/a",
                                    "--alpha=nan"], "alpha must be a finite number, got nan"),
        ("proxy expert alone", ["launch.serve", "--source=/nonexistent/model", "--expert=/e"],
         "needs both an expert and an anti_expert"),
        ("missing export source", ["launch.export_hf", "--source=/nonexistent/model", f"--output={work}"],
         "/nonexistent/model"),
        ("missing extension source", ["launch.extend_context", "--source=/nonexistent/model", f"--output={work}"],
         "/nonexistent/model"),
        ("unknown local-sgd arm", ["launch.local_sgd", "--config=experiments/local_sgd/config.py:nosuch",
                                   f"--workdir={work}"], "nosuch"),
        ("unknown aot preset", ["launch.aot_compile", "--model=llama9"], "llama9"),
        ("unknown topology", ["launch.aot_compile", "--topology=v9:1x1"], "v9:1x1"),
        ("misspelt reft field", ["launch.reft", "--config=experiments/reft/config.py", f"--workdir={work}",
                                 "--stage=all", "--config.nosuch=1"], "nosuch"),
        ("misspelt self-rewarding field", ["launch.self_rewarding", "--config=experiments/self_rewarding/config.py",
                                           f"--workdir={work}", "--config.nosuch=1"], "nosuch"),
        ("misspelt chatqa field", ["launch.chatqa", "--config=experiments/chatqa/config.py", f"--workdir={work}",
                                   "--stage=all", "--config.nosuch=1"], "nosuch"),
    ]


def _names():
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        return [name for name, _, _ in _cases(pathlib.Path(tmp))]


@pytest.mark.slow
@pytest.mark.parametrize("name", _names())
def test_bad_input_is_one_clear_line(name, tmp_path):
    argv, fragment = {n: (a, f) for n, a, f in _cases(tmp_path)}[name]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-m", *argv], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, f"{name}: exit 0\n{output[-2000:]}"
    assert "Traceback" not in output, f"{name}: traceback\n{output[-3000:]}"
    assert fragment in output, f"{name}: the message does not name {fragment!r}\n{output[-2000:]}"
