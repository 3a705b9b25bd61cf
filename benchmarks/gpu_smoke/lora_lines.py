"""The ``vLLMOffline`` layout's LoRA lines (an adapter loaded, refused after its unload) and one
``dspy.GRPO``-style reinforce step (methods of :class:`..smoke.Smoke`)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

from .runner import Check, _error_text, check


class LoraLines:
    """Lines over the ``offline`` LM's adapters (``Smoke`` gives ``plan``, ``_lm``, ``_prompt``)."""

    def lora_with_adapter(self) -> str:
        import dspy
        from dspy.utils.exceptions import AdapterParseError

        from ..lora_bench import write_random_adapter

        lm = self._lm("offline")
        path = write_random_adapter(self.plan.model, os.path.join(self.plan.work_dir, "adapter-smoke-r8"), 8, seed=0)
        t0 = time.monotonic()
        loaded = lm.load_adapter(self.ADAPTER, path)
        seconds = time.monotonic() - t0
        check(loaded.adapter == self.ADAPTER, f"load_adapter returned an LM of adapter {loaded.adapter!r}")
        # DSPy's response cache on (its default; the base LM has cache=False): issue 22 was
        # answers cached while the adapter was loaded coming back after its unload.
        tuned = lm.with_adapter(self.ADAPTER).copy(cache=True)
        check(tuned.adapter == self.ADAPTER, f"with_adapter LM carries adapter {tuned.adapter!r}")
        self.tuned = tuned
        self.asked = {"prompt": self._prompt("Say hello."), "question": f"What is 2 + 3? ({self.salt})"}
        before = lm.stats()[0]["requests"]
        [text] = tuned(self.asked["prompt"])
        check(isinstance(text, str) and text.strip(), f"empty answer from the adapter: {text!r}")
        with dspy.context(lm=tuned):
            try:
                dspy.Predict("question -> answer")(question=self.asked["question"])
                predicted = "a Prediction"
            except AdapterParseError:
                predicted = "an adapter parse error (noise)"
        stats = lm.stats()[0]
        check(self.ADAPTER in stats.get("adapters", []), f"stats()[0]['adapters'] = {stats.get('adapters')}")
        check(stats["requests"] >= before + 2, "the adapter's requests did not reach the engine")
        listed = [a["name"] for a in lm.adapters()]
        check(listed == [self.ADAPTER], f"lm.adapters() names {listed}")
        return (f"loaded in {seconds:.1f} s; lm(prompt) answered {len(text)} chars, dspy.Predict ended in "
                f"{predicted}; stats adapters {stats['adapters']}, requests +{stats['requests'] - before}")

    def _refused(self, exc: BaseException) -> bool:
        """The adapter's refusal, not an answer: an error that names the adapter (and not
        DSPy's parse error, which means an answer, cached or not, was read)."""
        from dspy.utils.exceptions import AdapterParseError

        return not isinstance(exc, AdapterParseError) and self.ADAPTER in str(exc)

    def _after_unload(self, label: str, call: Callable[[], Any]) -> tuple[bool, str]:
        """(refused?, what happened) for one call of the unloaded adapter's LM."""
        try:
            out = call()
        except Exception as exc:
            if self._refused(exc):
                return True, f"{label}: refused"
            return False, f"{label}: {type(exc).__name__} (an answer was parsed, not refused)"
        answer = getattr(out, "answer", out)
        return False, f"{label}: answered {str(answer)[:40]!r}"

    def lora_unload_refused(self) -> str:
        lm = self._lm("offline")
        check(self.tuned is not None, "no adapter LM (lora.with_adapter failed)")
        lm.unload_adapter(self.ADAPTER)
        check(lm.adapters() == [], f"still listed after unload: {lm.adapters()}")
        check(all(self.ADAPTER not in s.get("adapters", []) for s in lm.stats()), "stats still list the adapter")
        before = lm.stats()[0]["requests"]
        try:
            out = self.tuned(self._prompt("Say hello again."))
        except Exception as exc:
            check(self._refused(exc), f"raised {_error_text(exc)}, not a refusal naming the adapter")
            check(lm.stats()[0]["requests"] == before, "the refused request reached the engine")
            return f"a new call refused: {_error_text(exc)}"
        raise Check(f"the unloaded adapter's LM answered a new call: {out!r:.80}")

    def lora_unload_predict(self) -> str:
        import dspy

        lm = self._lm("offline")
        check(self.tuned is not None, "no adapter LM (lora.with_adapter failed)")
        check(self.ADAPTER not in [a["name"] for a in lm.adapters()], "the adapter is still loaded")
        before = lm.stats()[0]["requests"]

        def predict(question):
            with dspy.context(lm=self.tuned):
                return dspy.Predict("question -> answer")(question=question)

        # Issue 22: what DSPy cached for the adapter while it was loaded, asked again.
        new_question = f"What is 3 + 4? ({self.salt})"
        outcomes = [self._after_unload("dspy.Predict, a new question", lambda: predict(new_question)),
                    self._after_unload("dspy.Predict, the question asked before the unload",
                                       lambda: predict(self.asked["question"])),
                    self._after_unload("lm(prompt), the call answered before the unload",
                                       lambda: self.tuned(self.asked["prompt"]))]
        served = lm.stats()[0]["requests"] - before
        summary = "; ".join(text for _, text in outcomes)
        check(all(ok for ok, _ in outcomes), f"requests +{served} (0: DSPy's cache answered; issue 22): {summary}")
        check(served == 0, f"{served} refused request(s) reached the engine")
        return summary

    def grpo_step(self) -> str:
        from dspy.clients.utils_finetune import TrainDataFormat

        lm = self._lm("offline")
        t0 = time.monotonic()
        job = lm.reinforce({"adapter_name": "smoke-grpo", "rank": 8, "learning_rate": 1e-4,
                            "output_dir": os.path.join(self.plan.work_dir, "grpo"), "groups_per_step": 1,
                            # TRL's names as DSPy's tutorials write them (lora/grpo_kwargs.py), and the
                            # trainer's paths they open: two passes of 2 for one update, checkpointing, DAPO
                            "per_device_train_batch_size": 2, "gradient_accumulation_steps": 2, "bf16": True,
                            "gradient_checkpointing": True, "loss_type": "dapo",
                            "lr_scheduler_type": "constant_with_warmup", "report_to": "none"})
        init_s = time.monotonic() - t0
        try:
            initial = job.get_status()
            pending, device = initial["pending_batch_ids"], initial["device"]
            check(len(pending) == 1, f"pending_batch_ids {pending} (groups_per_step 1)")
            # vLLMOffline on one GPU: the trainer shares it (it trained on the CPU until 2026-12-05)
            check(device == ("cpu" if self.plan.cpu else "cuda:0"), f"the trainer is on {device!r}")
            prompt = self._prompt("Answer yes or no: is the sky green?")
            messages = [{"role": "user", "content": prompt}]  # the group's chat, as DSPy's GRPO hands it over
            completions = [lm(prompt, temperature=1.0)[0] for _ in range(4)]
            group = [{"messages": messages, "completion": {"role": "assistant", "content": text or ""},
                      "reward": float(i % 2)} for i, text in enumerate(completions)]
            t1 = time.monotonic()
            job.step(train_data=[{"batch_id": pending[0], "group": group}],
                     train_data_format=TrainDataFormat.GRPO_CHAT)
            step_s = time.monotonic() - t1
            status = job.get_status()
            check(status["version"] == 1 and lm.adapter == "smoke-grpo-v1",
                  f"after one step: version {status['version']}, the LM serves {lm.adapter!r}")
            [text] = lm(self._prompt("Say hello."))
            check(isinstance(text, str), f"no answer from the new version: {text!r}")
            served = lm.stats()[0].get("served_by") or {}
            check("smoke-grpo-v1" in str(served), f"stats served_by {served}: the new version served nothing")
            folder = job.save_checkpoint("smoke-ckpt")
            check(os.path.exists(os.path.join(folder, "adapter_config.json")), f"no PEFT adapter in {folder}")
            last = status.get("last_step") or {}
            check(last.get("updates") == 1, f"last_step {last}: 4 completions in 2 passes of 2 make one update")
        finally:
            job.terminate()
        lm.switch_adapter(None)
        return (f"reinforce (trainer on {device}, loaded) {init_s:.1f} s; one step of 4 completions {step_s:.1f} s "
                f"(swap {status['swap_seconds']}); loss {last.get('loss')}; served by {served}")
