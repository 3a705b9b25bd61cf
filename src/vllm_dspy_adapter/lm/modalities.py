"""Which kinds of input a model takes, and the check every DSPy request passes
before anything is submitted.

An image sent to a text-only model used to fail deep inside the chat template
(``can only concatenate str (not "list") to str``). Here it fails first, with an
error that names the modality and the model; the LM keeps serving.

- what vLLM says a loaded model takes is read by ``vllm_api.model_modalities`` (engine side);
- ``request_modalities``: the media parts a request holds (driver side, pure);
- ``check_modalities``: refuse a request the model cannot take.
"""

from __future__ import annotations

from collections.abc import Collection

from ..errors import UnsupportedModalityError
from ..protocol import ReplicaInfo

__all__ = ["HANDLED", "check_modalities", "request_modalities", "supported_from_info"]


# lm15 part types that are an input modality of some vLLM model.
_MEDIA = ("image", "audio", "video")

# Modalities this adapter passes to vLLM today (render.request_to_messages).
HANDLED = frozenset({"image"})


def supported_from_info(info: ReplicaInfo) -> tuple[str, ...]:
    """The modalities a replica's ``ReplicaInfo`` reports; without a list, a multimodal
    model is taken to take images."""
    if info.modalities is not None:
        return tuple(info.modalities)
    return ("image",) if info.is_multimodal else ()


def request_modalities(request) -> list[tuple[str, str]]:
    """(modality, where) for every media part of a request, in order; ``where``
    is the lm15 path of the part (``messages[2].parts[1]``)."""
    found: list[tuple[str, str]] = []
    system = request.system if isinstance(request.system, tuple) else ()
    for j, part in enumerate(system):
        if part.type in _MEDIA:
            found.append((part.type, f"system[{j}]"))
    for i, message in enumerate(request.messages):
        for j, part in enumerate(message.parts):
            if part.type in _MEDIA:
                found.append((part.type, f"messages[{i}].parts[{j}]"))
            elif part.type == "tool_result":
                for k, item in enumerate(part.content):
                    if item.type in _MEDIA:
                        found.append((item.type, f"messages[{i}].parts[{j}].content[{k}]"))
    return found


def check_modalities(request, supported: Collection[str], *, model: str) -> None:
    """Raise ``UnsupportedModalityError`` for the first media part the model, or
    this adapter, cannot take. Nothing has been submitted when it raises."""
    for modality, where in request_modalities(request):
        if modality not in supported:
            takes = ", ".join(["text", *sorted(supported)])
            raise UnsupportedModalityError(
                f"{model} takes no {modality} input (it takes: {takes}), but the request holds {modality} input "
                f"at {where}. Use a model with {modality} support (for example "
                f"{_EXAMPLES.get(modality, 'a multimodal model')}), or remove the {modality} field from the signature.",
                modality=modality, model=model, where=where,
            )
        if modality not in HANDLED:
            raise UnsupportedModalityError(
                f"{model} takes {modality} input, but vllm-dspy-adapter does not pass {modality} parts to vLLM "
                f"yet ({where}); only images are passed today.",
                modality=modality, model=model, where=where,
            )


_EXAMPLES = {
    "image": "Qwen/Qwen2.5-VL-3B-Instruct",
    "audio": "Qwen/Qwen2-Audio-7B-Instruct",
    "video": "Qwen/Qwen2.5-VL-3B-Instruct",
}
