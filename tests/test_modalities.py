"""Modality checks (modalities.py): which media parts a request holds, and the refusal
that names the modality and the model. Pure; the real-engine check is in
tests/test_features_engine.py."""

import base64

import pytest
from dspy._vendor.lm15.types import audio, image
from dspy.lm15 import Message, Request, TextPart, ToolResultPart

from vllm_dspy_adapter.errors import UnsupportedInputError, UnsupportedModalityError
from vllm_dspy_adapter.lm.modalities import check_modalities, request_modalities, supported_from_info
from vllm_dspy_adapter.protocol import ReplicaInfo

PNG = base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"\0" * 16).decode()
WAV = base64.b64encode(b"RIFF" + b"\0" * 40).decode()


def _request(*parts, tool_parts=()):
    messages = [Message.user(list(parts) or "hi")]
    if tool_parts:
        messages.append(Message(role="tool", parts=(ToolResultPart(id="c1", content=tuple(tool_parts)),)))
    return Request(model="m", messages=tuple(messages))


def test_media_parts_are_found_with_their_path():
    request = _request(TextPart("look"), image(data=PNG, media_type="image/png"),
                       audio(data=WAV, media_type="audio/wav"))
    assert request_modalities(request) == [("image", "messages[0].parts[1]"), ("audio", "messages[0].parts[2]")]
    assert request_modalities(_request(TextPart("only text"))) == []


def test_text_only_model_refuses_an_image_naming_both():
    request = _request(TextPart("what is this?"), image(data=PNG, media_type="image/png"))
    with pytest.raises(UnsupportedModalityError) as info:
        check_modalities(request, (), model="SmolLM2-135M-Instruct")
    message = str(info.value)
    assert "SmolLM2-135M-Instruct takes no image input (it takes: text)" in message
    assert "messages[0].parts[1]" in message and "Qwen2.5-VL" in message
    assert isinstance(info.value, UnsupportedInputError)  # only that request fails
    assert (info.value.modality, info.value.model) == ("image", "SmolLM2-135M-Instruct")


def test_audio_is_refused_for_a_vision_model_and_not_yet_passed_for_an_audio_model():
    request = _request(TextPart("listen"), audio(data=WAV, media_type="audio/wav"))
    with pytest.raises(UnsupportedModalityError, match=r"vl takes no audio input \(it takes: text, image\)"):
        check_modalities(request, ("image",), model="vl")
    with pytest.raises(UnsupportedModalityError, match="does not pass audio parts to vLLM yet"):
        check_modalities(request, ("audio",), model="qwen-audio")


def test_images_pass_for_a_vision_model_and_inside_tool_results():
    request = _request(TextPart("see"), tool_parts=(image(data=PNG, media_type="image/png"),))
    assert request_modalities(request) == [("image", "messages[1].parts[0].content[0]")]
    check_modalities(request, ("image", "video"), model="vl")  # no error
    with pytest.raises(UnsupportedModalityError):
        check_modalities(request, (), model="text-only")


def test_engine_info_without_a_modality_list_means_images_for_multimodal_models():
    assert supported_from_info(ReplicaInfo(max_model_len=8, is_multimodal=False)) == ()
    assert supported_from_info(ReplicaInfo(max_model_len=8, is_multimodal=True)) == ("image",)
    assert supported_from_info(ReplicaInfo(max_model_len=8, is_multimodal=True,
                                           modalities=("audio", "image"))) == ("audio", "image")


def test_the_error_pickles_across_processes():
    import pickle

    copy = pickle.loads(pickle.dumps(UnsupportedModalityError("no images", modality="image", model="m")))
    assert str(copy) == "no images"
