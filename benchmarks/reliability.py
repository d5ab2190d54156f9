r"""Crash-resume campaign for `launch.train`: kills, preemptions, corrupt checkpoints and a full disk.

  nice -n 10 python benchmarks/reliability.py [--kills=20 --sigterms=4 --corruptions=4 --seed=0]

The main job's config (`experiments/pretrain/config.py`) on the `tiny` model (2 layers, d_model
64, batches of 8 × 32 tokens, 40 steps, a checkpoint every 5, a metrics record every step) runs
once uninterrupted, then again in other workdirs under fire: each launch (the same command every
time) is SIGKILLed at a random moment — at a uniformly random time, or inside a checkpoint write
(the moment orbax's temporary `<step>.orbax-checkpoint-tmp-*` directory appears in `checkpoints/`,
found by polling the filesystem from outside, plus a random delay of 0–0.2 s) — or sent
SIGTERM once a step has run (preemption: it must save and exit with status 143), or, between
launches, its newest checkpoint is truncated or has files deleted (a launch must fall back to the
previous one with a warning naming the bad step). It is restarted until it finishes; then the
loss of every step (metrics.jsonl) and the final checkpoint's params must equal the uninterrupted
run's bit for bit, and no launch may have failed (exit status other than 0, the kill's, or 143
after SIGTERM). A launch that finishes before its interruption lands is compared too, the
interruption is retried, and the campaign goes on in a fresh workdir. Random kills land within
the reference run's wall time.

Finally (as root, where a tmpfs can be mounted) the run is started in a 20 MiB tmpfs, room for one (12.6 MB)
checkpoint: the second checkpoint's write fails, the run must stop with a one-line error naming the
full disk, and the first checkpoint must still restore (verified against its fingerprint).

Results go to stdout and `benchmarks/results/reliability.json`. `tests/reliability/` runs short
versions of the same functions.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
STEPS = 40


def train_args(steps: int = STEPS, checkpoint_every: int = 5) -> list[str]:
    """`launch.train` flags: the main job's config on the tiny model."""
    return ["--config=experiments/pretrain/config.py", "--config.model.preset=tiny", f"--config.steps={steps}",
            "--config.batch_size=8", "--config.seq_len=32", "--config.log_every=1",
            f"--config.checkpoint_every={checkpoint_every}", "--config.peak_flops=1e11", "--config.sample_tokens=4",
            "--config.mesh=fsdp:-1"]


def _env() -> dict:
    return {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
            "JAX_COMPILATION_CACHE_DIR": os.environ.get("JAX_COMPILATION_CACHE_DIR", str(ROOT / ".jax_cache")),
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0.5"}


def launch(workdir: pathlib.Path, args: list[str], log_dir: pathlib.Path | None = None) -> subprocess.Popen:
    """`python -m launch.train <args> --workdir=<workdir>`, stdout and stderr to numbered files in
    `log_dir` (default: `<workdir>_logs` beside workdir)."""
    log_dir = log_dir or workdir.parent / f"{workdir.name}_logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    n = len(list(log_dir.glob("*.out")))
    paths = log_dir / f"{n:03d}.out", log_dir / f"{n:03d}.err"
    with open(paths[0], "w") as out, open(paths[1], "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "launch.train", *args, f"--workdir={workdir}"], cwd=ROOT,
                                env=_env(), stdout=out, stderr=err)
    proc.log_paths = paths
    return proc


def output(proc: subprocess.Popen) -> tuple[str, str]:
    """(stdout, stderr) of a `launch`ed process so far."""
    return proc.log_paths[0].read_text(), proc.log_paths[1].read_text()


def losses(workdir: pathlib.Path) -> dict[int, float]:
    """{step: loss} of metrics.jsonl (one record per step with log_every 1)."""
    path = workdir / "metrics.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    steps = [r["step"] for r in records]
    if len(steps) != len(set(steps)):
        raise AssertionError(f"metrics.jsonl of {workdir} repeats steps: {steps}")
    return {r["step"]: r["loss"] for r in records}


def final_params(workdir: pathlib.Path):
    """The params of the newest checkpoint of `workdir`, as NumPy arrays (verified restore)."""
    import jax
    import numpy as np

    from jaxllm.model import llama, presets
    from jaxllm.train import checkpoint
    abstract = jax.eval_shape(lambda: llama.init_params(presets.get("tiny", vocab_size=4096), jax.random.key(0)))
    return jax.tree.map(np.asarray, checkpoint.restore_params(workdir / "checkpoints", abstract))


def assert_same_run(reference: pathlib.Path, workdir: pathlib.Path, steps: int) -> None:
    """Losses of every step and final params equal, bit for bit."""
    import jax
    import numpy as np
    want, got = losses(reference), losses(workdir)
    if sorted(got) != list(range(1, steps + 1)):
        raise AssertionError(f"{workdir} logged steps {sorted(got)}, expected 1..{steps}")
    differing = [s for s in want if np.float32(want[s]).tobytes() != np.float32(got[s]).tobytes()]
    if differing:
        raise AssertionError(f"losses differ at steps {differing}: " +
                             ", ".join(f"{s}: {want[s]!r} vs {got[s]!r}" for s in differing[:5]))
    a, b = final_params(reference), final_params(workdir)
    flat_a, flat_b = jax.tree_util.tree_flatten_with_path(a)[0], jax.tree_util.tree_flatten_with_path(b)[0]
    bad = [jax.tree_util.keystr(p) for (p, x), (_, y) in zip(flat_a, flat_b) if x.tobytes() != y.tobytes()]
    if bad or len(flat_a) != len(flat_b):
        raise AssertionError(f"final params differ: {bad[:5]}")


def _checkpoints(workdir: pathlib.Path) -> list[str]:
    try:
        return [e.name for e in os.scandir(workdir / "checkpoints")]
    except FileNotFoundError:
        return []


def committed_steps(workdir: pathlib.Path) -> list[int]:
    return sorted(int(name) for name in _checkpoints(workdir) if name.isdigit())


def wait_for_write(proc: subprocess.Popen, workdir: pathlib.Path, timeout: float) -> bool:
    """Polls until a new temporary checkpoint directory appears (True) or the process ends (False)."""
    seen = {n for n in _checkpoints(workdir) if "tmp" in n}
    deadline = time.time() + timeout
    while proc.poll() is None and time.time() < deadline:
        if any("tmp" in n and n not in seen for n in _checkpoints(workdir)):
            return True
        time.sleep(0.002)
    return False


def wait_for_training(proc: subprocess.Popen, timeout: float) -> bool:
    """Polls until this launch has printed a step's progress line (the loop, with its SIGTERM
    handler, is running)."""
    deadline = time.time() + timeout
    while proc.poll() is None and time.time() < deadline:
        if "| loss " in output(proc)[0]:
            return True
        time.sleep(0.05)
    return False


def corrupt_newest(workdir: pathlib.Path, rng: random.Random) -> tuple[int, str] | None:
    """Truncates a file of, or deletes files from, the newest checkpoint if an older one exists;
    (step, what was done) or None."""
    steps = committed_steps(workdir)
    if len(steps) < 2:
        return None
    newest = workdir / "checkpoints" / str(steps[-1])
    files = sorted(p for p in newest.rglob("*") if p.is_file() and p.stat().st_size > 0)
    if rng.random() < 0.5:
        target = max((p for p in files if "state" in p.parts), key=lambda p: p.stat().st_size)
        with open(target, "r+b") as f:
            f.truncate(target.stat().st_size // 2)
        return steps[-1], f"truncated {target.relative_to(newest)}"
    victim = rng.choice(["state", "meta", "data"])
    shutil.rmtree(newest / victim)
    return steps[-1], f"deleted {victim}/"


def finish(workdir: pathlib.Path, args: list[str], timeout: float = 900) -> subprocess.Popen:
    proc = launch(workdir, args)
    proc.wait(timeout=timeout)
    return proc


def make_plan(kills: int, sigterms: int, seed: int = 0) -> list[str]:
    """`kills` SIGKILLs (half at a random time, half inside a checkpoint write) and `sigterms`
    preemptions, shuffled."""
    plan = ["kill_random", "kill_in_write"] * (kills // 2) + ["kill_random"] * (kills % 2) + ["sigterm"] * sigterms
    random.Random(seed).shuffle(plan)
    return plan


def campaign(root: pathlib.Path, plan: list[str], *, corruptions: int = 0, seed: int = 0, steps: int = STEPS,
             checkpoint_every: int = 5, log=print) -> dict:
    """Runs the reference, then relaunches the interrupted run in `root` with one interruption per
    `plan` entry ("kill_random", "kill_in_write" or "sigterm"; an entry whose launch finished
    before it landed is retried, at most once more per entry) and launches until it finishes;
    `corruptions` launches start after the newest checkpoint was corrupted. A run that finishes is
    compared with the reference bit for bit and the rest of the plan continues on a fresh workdir.
    Raises AssertionError on any failed launch, missing fallback warning or difference; returns
    the counts."""
    rng = random.Random(seed)
    args = train_args(steps, checkpoint_every)
    reference = root / "reference"
    t0 = time.time()
    proc = finish(reference, args)
    if proc.returncode != 0:
        raise AssertionError(f"reference run failed ({proc.returncode}): {output(proc)[1][-2000:]}")
    run_s = time.time() - t0  # random kills land within one uninterrupted launch's wall time
    train_s = sum(json.loads(line)["step_time_s"] or 0 for line in (reference / "metrics.jsonl").open())
    log(f"reference run: {run_s:.0f} s, of which {train_s:.1f} s in training steps")  # SIGTERMs land within those
    stats = {"launches": 0, "sigkill": 0, "sigkill_in_write": 0, "sigterm_143": 0, "corruptions": 0,
             "fallbacks": [], "missed_interruptions": 0, "sigterm_after_finish": 0,
             "runs_compared": 0}
    queue, retries = list(plan), len(plan)
    workdir = root / "interrupted_0"
    pending_corruptions = corruptions
    unwarned: set[int] = set()  # corrupted steps no launch has warned about yet (a kill can come first)
    while True:
        action = queue.pop(0) if queue else "finish"
        corrupted = None
        if pending_corruptions and not unwarned and (action == "finish" or rng.random() < 0.6):
            corrupted = corrupt_newest(workdir, rng)
            if corrupted:
                pending_corruptions -= 1
                stats["corruptions"] += 1
                unwarned.add(corrupted[0])
        proc = launch(workdir, args)
        stats["launches"] += 1
        if action == "kill_random":
            time.sleep(rng.uniform(0, run_s))
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
        elif action == "kill_in_write":
            if wait_for_write(proc, workdir, timeout=600):
                time.sleep(rng.uniform(0, 0.2))
                if proc.poll() is None:
                    proc.send_signal(signal.SIGKILL)
                    stats["sigkill_in_write"] += 1
        elif action == "sigterm":
            if wait_for_training(proc, timeout=600):
                time.sleep(rng.uniform(0, train_s))
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=900)
        out, err = output(proc)
        rc = proc.returncode
        log(f"launch {stats['launches']:3d} {workdir.name} {action:14s} rc {rc:4d} checkpoints "
            f"{committed_steps(workdir)}" + (f" after corrupting step {corrupted[0]} ({corrupted[1]})" if corrupted else ""))
        for step in sorted(unwarned):
            if f"checkpoint step {step} " in err:
                unwarned.discard(step)
                stats["fallbacks"].append(step)
        if unwarned and rc in (0, 128 + signal.SIGTERM):
            raise AssertionError(f"no fallback warning naming step(s) {sorted(unwarned)}: {err[-2000:]}")
        if rc == -signal.SIGKILL and action.startswith("kill"):
            stats["sigkill"] += 1
        elif rc == 128 + signal.SIGTERM and action == "sigterm":
            if "SIGTERM: checkpoint at step" not in out:
                raise AssertionError(f"exit 143 without the SIGTERM checkpoint line: {out[-1000:]}")
            stats["sigterm_143"] += 1
        elif rc == 0 or rc == -signal.SIGTERM and action == "sigterm" and steps in committed_steps(workdir):
            # (-SIGTERM: the signal came after `fit` had returned with everything saved, while the
            # process was exiting; the run is complete and a restart has nothing to do)
            stats["sigterm_after_finish"] += rc == -signal.SIGTERM
            if sorted(losses(workdir)) != list(range(1, steps + 1)):
                raise AssertionError(f"exit 0 before the last step: {sorted(losses(workdir))}")
            assert_same_run(reference, workdir, steps)
            stats["runs_compared"] += 1
            if action != "finish":
                stats["missed_interruptions"] += 1
                if retries:
                    retries -= 1
                    queue.append(action)
            if not queue:
                return stats
            workdir = root / f"interrupted_{stats['runs_compared']}"
        else:
            raise AssertionError(f"launch {stats['launches']} ({action}) failed with status {rc}: {err[-3000:]}")


def full_disk(root: pathlib.Path, size: str = "20m", steps: int = 20, checkpoint_every: int = 5) -> dict:
    """Runs in a `size` tmpfs (root only; returns {"skipped": reason} otherwise); raises
    AssertionError unless the run stops with a one-line error naming the full disk and the previous
    checkpoint restores."""
    mount = root / "full_disk"
    mount.mkdir(parents=True, exist_ok=True)
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)],
                         capture_output=True, text=True)
    if res.returncode != 0:
        return {"skipped": f"cannot mount a tmpfs: {res.stderr.strip()}"}
    try:
        workdir = mount / "run"
        proc = launch(workdir, train_args(steps, checkpoint_every), log_dir=root / "full_disk_logs")
        proc.wait(timeout=900)
        out, err = output(proc)
        last_line = err.strip().splitlines()[-1] if err.strip() else ""
        if proc.returncode != 2 or not last_line.startswith("error: OSError: [Errno 28] checkpoint of step"):
            raise AssertionError(f"full disk: status {proc.returncode}, stderr ends {err[-3000:]}")
        good = committed_steps(workdir)
        if not good:
            raise AssertionError("full disk: no checkpoint survived")
        final_params(workdir)  # raises unless the newest committed checkpoint restores and verifies
        return {"status": proc.returncode, "error": last_line, "intact_checkpoints": good}
    finally:
        subprocess.run(["umount", str(mount)], check=False)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--sigterms", type=int, default=4)
    parser.add_argument("--corruptions", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", default="", help="default: a fresh temporary directory")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "reliability.json"))
    a = parser.parse_args()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # this process only reads checkpoints
    root = pathlib.Path(a.workdir or tempfile.mkdtemp(prefix="jaxllm_reliability_"))
    t0 = time.time()
    stats = campaign(root, make_plan(a.kills, a.sigterms, a.seed), corruptions=a.corruptions, seed=a.seed)
    stats["full_disk"] = full_disk(root)
    stats.update(wall_s=round(time.time() - t0), seed=a.seed, command=" ".join(sys.argv),
                 date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
    print(json.dumps(stats, indent=1))
    pathlib.Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    pathlib.Path(a.out).write_text(json.dumps(stats, indent=1) + "\n")


if __name__ == "__main__":
    main()
