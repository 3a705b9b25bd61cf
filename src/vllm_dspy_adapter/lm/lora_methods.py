"""LoRA adapters on both LM classes: load, unload, list, and an LM per adapter.

``vLLMOffline`` and ``vLLMOfflineMultiGPU`` take this mixin; the work is done by
the pool (``pool.load_adapter``: every live replica or none, again after a
restart) and the checks by ``lora.read_adapter`` (before any engine sees the
adapter). See docs/LORA_GUIDE.md.
"""

from __future__ import annotations

from typing import Any

from .dspy_engine import AsyncDSPyEngine, DSPyEngine
from ..errors import ConfigurationError

__all__ = ["LoRAMixin"]


class LoRAMixin:
    """Adapter methods of the LM classes (they set ``self._runtime``)."""

    def load_adapter(self, name: str, path: str, *, timeout: float = 300.0):
        """Load the PEFT LoRA adapter in folder ``path`` under ``name`` on every live
        replica (and on replicas restarted later); returns ``self.with_adapter(name)``.

        Refused before any request, with ``ConfigurationError``: an LM built without
        ``enable_lora=True``, a folder that is not a PEFT LoRA adapter, a rank above
        ``max_lora_rank``, or an adapter vLLM does not accept for this model (then
        it is loaded on no replica). Loading a name again replaces that adapter."""
        self._runtime.load_adapter(name, path, timeout=timeout)
        return self.with_adapter(name)

    def unload_adapter(self, name: str) -> None:
        """Unload adapter ``name`` from every replica; LMs made by ``with_adapter(name)``
        then fail fast. ``ConfigurationError`` if no such adapter is loaded."""
        self._runtime.pool.unload_adapter(name)

    def adapters(self) -> list[dict[str, Any]]:
        """The loaded adapters: name, folder, rank, cache label, and which replicas hold it now."""
        runtime = self._runtime
        return [{"name": a.name, "path": a.path, "rank": a.rank, "label": a.label(runtime.label),
                 "replicas": [r.index for r in runtime.replicas if a.name in r.adapters]}
                for a in runtime.pool.adapters.all()]

    def with_adapter(self, name: str | None):
        """A DSPy LM sharing this LM's replicas whose every request carries adapter
        ``name`` (None: the base model), whatever this LM serves now or later: it has
        its own engines, so ``switch_adapter`` on this LM (a ``dspy.GRPO`` run) never
        moves it. Its ``model`` is the adapter's own cache label, so DSPy never returns
        a base-model answer for it, nor one of an earlier adapter saved in the same folder."""
        runtime = self._runtime
        return self.copy(model=runtime.label if name is None else runtime.adapter_model(name))

    def switch_adapter(self, name: str | None) -> None:
        """Move this LM's requests to adapter ``name`` (None: the base model) in place: this
        LM and every copy sharing its engines (``lm.copy(temperature=...)``, DSPy's rollout
        copies; never an LM made by ``with_adapter`` or ``copy(model=...)``, which is pinned)
        send each request from now on with it, and ``model`` becomes its label. A request already submitted finishes with the adapter it was sent with.
        This is how a ``dspy.GRPO`` run's student LM follows each new adapter version
        (DSPy's GRPO updates the student's LM in place). ``ConfigurationError`` if
        ``name`` is not loaded."""
        runtime = self._runtime
        label = runtime.label if name is None else runtime.adapter_model(name)
        self.engine.binding.switch(name, label)
        self.model = label

    @property
    def adapter(self) -> str | None:
        """The adapter this LM's requests carry; None for the base model."""
        return self.engine.adapter

    @property
    def _cache_responses(self) -> bool:
        """DSPy's switch for its response cache (read by ``dspy.clients.execution.prepare``
        on every call, before the cache lookup that runs before any engine). Off while
        this LM's adapter is not loaded (unloaded, or not loaded in this process:
        DSPy's disk cache outlives it) and after shutdown, so that such a call reaches
        the engine, which refuses it, instead of being answered from the cache under
        the adapter's label."""
        runtime = self._runtime
        if runtime.closed or self.model != self.engine.label:  # a copy whose engines switched adapter under it
            return False
        adapter = self.adapter
        return adapter is None or adapter in runtime.pool.adapters

    def copy(self, **kwargs: Any):
        """``dspy.LM.copy``. Without ``model=`` the copy shares this LM's engines, so it
        follows ``switch_adapter``. ``model=`` names the base model's label or an adapter's
        (what ``with_adapter`` and DSPy's ``lm.finetune`` pass): the copy gets engines of
        its own, pinned to that model, even when it is the one this LM serves now."""
        model = kwargs.get("model")
        if model is not None and "engine" not in kwargs:
            runtime = self._runtime
            name = None if model == runtime.label else runtime.adapter_of_label(model)
            if name is None and model != runtime.label:
                raise ConfigurationError(
                    f"{type(self).__name__}.copy(model={model!r}): the model of a running LM cannot change. "
                    f"Use the base model's label {runtime.label!r} or a loaded adapter's (lm.adapters()).")
            engine = DSPyEngine(runtime, name)
            kwargs["engine"] = engine
            kwargs["async_engine"] = AsyncDSPyEngine(runtime, binding=engine.binding)
        return super().copy(**kwargs)
