"""The MLflow chat model of an export (``--format mlflow``), logged as MLflow "models from code":
MLflow stores this file with the model and runs it when the model is loaded, so loading needs
MLflow, torch and transformers only, not tuneline.

It answers OpenAI-style chat requests (MLflow's ``ChatModel`` signature: ``{"messages": [...],
"max_tokens": N}``) with the merged model in the ``model`` artifact, greedily and with the
decoding settings the version was evaluated and is served with (its generation config), as
``tuneline serve`` does by default; ``max_tokens`` and ``stop`` are honoured, sampling
parameters are not. Nothing here imports tuneline.
"""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, cast

if TYPE_CHECKING:
    from mlflow.pyfunc import PythonModelContext
    from mlflow.pyfunc.model import ChatModel
    from mlflow.types.llm import ChatCompletionResponse, ChatMessage, ChatParams
    from transformers import (
        BatchEncoding,
        GenerationMixin,
        PreTrainedModel,
        PreTrainedTokenizerBase,
    )


def build() -> ChatModel:
    """The chat model (a ``mlflow.pyfunc.ChatModel``), built lazily: MLflow is imported only when
    MLflow itself loads this file."""
    from mlflow.pyfunc.model import ChatModel
    from mlflow.types.llm import ChatCompletionResponse

    class TunedChatModel(ChatModel):
        def load_context(self, context: PythonModelContext) -> None:
            import torch
            from transformers import AutoModelForCausalLM, AutoTokenizer

            folder = Path(context.artifacts["model"])
            self.tokenizer = AutoTokenizer.from_pretrained(folder)
            self.model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
            record_path = folder / "export.json"
            record = json.loads(record_path.read_text()) if record_path.is_file() else {}
            self.served = f"{record.get('model', 'model')}@{record.get('version', '?')}"

        def predict(self, context: PythonModelContext | None, messages: list[ChatMessage],  # type: ignore[override]
                    params: ChatParams) -> ChatCompletionResponse:  # ChatModel narrows PythonModel.predict
            chat = [{"role": m.role, "content": str(m.content or "")} for m in messages]
            return ChatCompletionResponse.from_dict(complete(self.model, self.tokenizer, chat, params.max_tokens,
                                                             params.stop, self.served))

    return TunedChatModel()


def complete(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, chat: list[dict[str, str]],
             max_tokens: int | None, stop: list[str] | None, served: str) -> dict[str, object]:
    """One chat completion (OpenAI's ``chat.completion`` object as a dict): the chat template applied,
    greedy decoding with the model's generation config, ``max_tokens`` and ``stop`` honoured."""
    import torch

    inputs = cast("BatchEncoding", tokenizer.apply_chat_template(
        chat, add_generation_prompt=True, return_tensors="pt", return_dict=True))
    config = model.generation_config
    limit = int(max_tokens or config.max_new_tokens or 64)
    with torch.no_grad():
        out = cast("GenerationMixin", model).generate(**inputs, max_new_tokens=limit, do_sample=False, pad_token_id=config.pad_token_id)
    new = out[0, inputs["input_ids"].shape[1]:].tolist()
    text = str(tokenizer.decode(new, skip_special_tokens=True))
    finish = "length" if len(new) >= limit and new[-1] != tokenizer.eos_token_id else "stop"
    for word in stop or []:
        if word and word in text:
            text, finish = text[:text.index(word)], "stop"
    prompt_tokens = int(inputs["input_ids"].shape[1])
    return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
            "model": served,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": len(new),
                      "total_tokens": prompt_tokens + len(new)}}


if __name__ != "tuneline.export.chat_model":  # run by MLflow as the model's code, never when tuneline imports it
    import mlflow.models

    mlflow.models.set_model(build())
