"""The ``vLLMOfflineMultiGPU`` layouts' lines: one worker replica, two replicas on the GPU,
``stats()``, cache routing from the engines' KV-cache events (methods of :class:`..smoke.Smoke`)."""

from __future__ import annotations

import time

from .runner import check


class ServingLines:
    """Lines over the ``proc1`` and ``rpg2`` LMs (``Smoke`` gives ``plan``, ``_lm``, ``_start``)."""


    def _multigpu(self, replicas: int):
        from vllm_dspy_adapter import vLLMOfflineMultiGPU

        plan = self.plan
        kwargs = dict(plan.engine, max_tokens=16)
        if replicas == 2:  # the cache-aware policy: the engines publish their KV-cache events
            from vllm_dspy_adapter.serving.cache_routing import CacheRouter
            from vllm_dspy_adapter.serving.routing import PrefixRouter

            # expect_s=0: only the engines' events count as held blocks (routing.cache_events reads them)
            self.cache_router = kwargs["routing"] = CacheRouter(fallback=PrefixRouter(), expect_s=0.0)
        if plan.cpu:
            kwargs["num_replicas"] = replicas
        else:
            kwargs.update(num_gpus=1, replicas_per_gpu=replicas,
                          gpu_memory_utilization=plan.single_memory if replicas == 1 else plan.rpg2_memory)
        return vLLMOfflineMultiGPU(plan.model, **kwargs)

    def _throughput(self, lm, n: int) -> tuple[list, float]:
        plan = self.plan
        lm.batch_generate(self._token_prompts(16, plan.batch_prompt_len), max_tokens=4, progress=False)  # warm-up
        prompts = self._token_prompts(n, plan.batch_prompt_len)
        t0 = time.monotonic()
        outs = lm.batch_generate(prompts, max_tokens=plan.batch_max_tokens, ignore_eos=True, progress=False,
                                 return_outputs=True)
        wall = time.monotonic() - t0
        check(len(outs) == n, f"{len(outs)} results for {n} prompts")
        bad = [o.num_output_tokens for o in outs if o.num_output_tokens != plan.batch_max_tokens]
        check(not bad, f"{len(bad)} results without {plan.batch_max_tokens} tokens (ignore_eos): {bad[:8]}")
        return outs, wall

    def multigpu_proc1(self) -> str:
        start = self._start("proc1", lambda: self._multigpu(1))
        lm = self.lms["proc1"]
        check(lm.num_replicas == 1, f"{lm.num_replicas} replicas")
        n = 256
        outs, wall = self._throughput(lm, n)
        tokens = sum(o.num_output_tokens for o in outs)
        [st] = lm.stats()
        check(not st.get("stalls") and not st.get("restarts"),
              f"stalls {st.get('stalls')}, restarts {st.get('restarts')}, last stall {st.get('last_stall')!r}, "
              f"last death {st.get('last_death')!r}")
        return (f"{n} requests ({self.plan.batch_prompt_len} in / {self.plan.batch_max_tokens} out) in {wall:.1f} s: "
                f"{n / wall:.1f} req/s, {tokens / wall:.0f} output tok/s; start {start:.0f} s; "
                f"device {st['device']}")

    def multigpu_rpg2(self) -> str:
        start = self._start("rpg2", lambda: self._multigpu(2))
        lm = self.lms["rpg2"]
        check(lm.num_replicas == 2, f"{lm.num_replicas} replicas")
        n = 512
        outs, wall = self._throughput(lm, n)
        stats = lm.stats()
        routed = [s["routed"] for s in stats]
        check(all(r > 0 for r in routed), f"routed {routed}: a replica took no request")
        served = sorted({o.replica for o in outs})
        check(served == [0, 1], f"results came from replicas {served}")
        return (f"{n} requests in {wall:.1f} s: {n / wall:.1f} req/s; routed {routed}; "
                f"devices {[s['device'] for s in stats]}; start {start:.0f} s")

    def stats(self) -> str:
        lm = self._lm("rpg2")
        stats = lm.stats()
        check(len(stats) == 2, f"{len(stats)} replica dicts")
        rows = []
        for s in stats:
            missing = [k for k in ("requests", "output_tokens", "prompt_tokens", "prefix_cache_hit_rate",
                                   "peak_unfinished", "routed", "alive", "device") if k not in s]
            check(not missing, f"replica {s.get('replica')}: no {missing} in stats()")
            check(s["alive"] and s["requests"] > 0 and s["output_tokens"] > 0, f"replica {s['replica']}: {s}")
            check(s["peak_unfinished"] > 1, f"replica {s['replica']}: peak_unfinished {s['peak_unfinished']} "
                                            "after a batch of 512")
            check(not s.get("stalls") and not s.get("restarts"),
                  f"replica {s['replica']}: stalls {s.get('stalls')}, restarts {s.get('restarts')}, last stall "
                  f"{s.get('last_stall')!r}, last death {s.get('last_death')!r}")
            rate = s["prefix_cache_hit_rate"]
            check(rate is None or 0.0 <= rate <= 1.0, f"prefix_cache_hit_rate {rate!r}")
            rows.append(f"#{s['replica']} {s['requests']} req {s['output_tokens']} tok "
                        f"hit {rate if rate is None else round(rate, 3)} peak {s['peak_unfinished']}")
        total = sum(s["requests"] for s in stats)
        check(total == sum(s["routed"] for s in stats), f"served {total} != routed {[s['routed'] for s in stats]}")
        return "; ".join(rows)

    def routing_cache_events(self) -> str:
        from vllm_dspy_adapter.serving.cache_routing import block_keys

        lm = self._lm("rpg2")
        router = self.cache_router
        policies = {row["routing"] for row in lm.stats()}
        check(policies == {"cache"}, f"stats() routing {policies}: the cache policy fell back (see the log)")
        prefix = " ".join(f"w{self.rng.randrange(10**6)}" for _ in range(200)) + f" ({self.salt})"
        [first] = lm.batch_generate([prefix + " Question 0?"], max_tokens=4, return_outputs=True, progress=False)
        ids = lm.engine.runtime.spec.tokenize(prefix + " Question 0?", chat=False)
        deadline = time.monotonic() + 10.0  # the events of the prefill: at once in-process, a beat later here

        def held() -> tuple[int, int]:  # the block size is learned from the first events
            keys = block_keys(ids, router.block_size)
            return router.matched(first.replica, keys, time.monotonic()), len(keys)

        while held()[0] == 0 and time.monotonic() < deadline:
            lm.batch_generate(["ping"], max_tokens=1, progress=False)  # routing drains the replicas' events
            time.sleep(0.5)
        held, blocks = held()
        check(held > 0, f"no KV-cache event of replica {first.replica} holds the prompt's {blocks} blocks "
                        f"(block size {router.block_size}) after 10 s")
        followups = [lm.batch_generate([prefix + f" Question {i}?"], max_tokens=4, return_outputs=True,
                                       progress=False)[0] for i in range(1, 4)]
        where = [g.replica for g in followups]
        check(where == [first.replica] * 3, f"follow-ups went to replicas {where}, the prefix is on {first.replica}")
        cached = [g.num_cached_tokens for g in followups]
        check(all(c >= router.block_size for c in cached), f"follow-ups' cached tokens {cached}")
        return (f"events hold {held}/{blocks} blocks of the prompt on replica {first.replica} "
                f"(block size {router.block_size}); follow-ups on {where}, cached tokens {cached}")
