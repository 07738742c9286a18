"""The lmms-eval model `nanovlm_hf`: a saved nanoVLM (a folder or Hub id) through AutoModelForImageTextToText /
AutoProcessor with trust_remote_code, on CPU or GPU, with the image-token budget as model arguments:

    lmms-eval --model nanovlm_hf --model_args pretrained=DIR,max_image_tokens=64,batch_size=8 --tasks mmstar

Registered through the `lmms_eval.models` entry point (setup.cfg), so lmms-eval finds it once nanoVLM is installed.
"""

from __future__ import annotations

import torch
from lmms_eval import utils
from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from lmms_eval.models.registry_v2 import ModelManifest
from tqdm import tqdm
from transformers import AutoModelForImageTextToText, AutoProcessor

MODEL_ID = "nanovlm_hf"  # `nanovlm` is another project's model in lmms-eval


def manifest() -> ModelManifest:
    """The entry point lmms-eval loads (`lmms_eval.models` group)."""
    return ModelManifest(model_id=MODEL_ID, simple_class_path=f"{__name__}.NanoVLMHF")


def _flag(value) -> bool:
    """lmms-eval's --model_args arrive as strings ("True", "false") or already typed."""
    return value if isinstance(value, bool) else str(value).lower() in ("1", "true", "yes")


class NanoVLMHF(lmms):
    """nanoVLM for lmms-eval: batched, left-padded generation (greedy, sampling or beam search as a task's
    generation kwargs ask) and loglikelihood, each image planned under `max_image_tokens`."""

    def __init__(
        self,
        pretrained: str,
        device: str | None = None,
        dtype: str = "float32",
        batch_size: int | str = 1,
        max_image_tokens: int | str | None = None,
        max_image_tokens_per_sample: int | str | None = None,
        trust_remote_code: bool | str = True,
        revision: str | None = None,
        **kwargs,
    ) -> None:
        super().__init__()
        if kwargs:
            raise TypeError(f"nanovlm_hf: unknown model argument(s) {sorted(kwargs)}")
        self._device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        torch_dtype = dtype if dtype == "auto" else getattr(torch, dtype)
        load = {"trust_remote_code": _flag(trust_remote_code), "revision": revision}
        self.model = AutoModelForImageTextToText.from_pretrained(pretrained, dtype=torch_dtype, **load)
        self.model.to(self._device).eval()
        self.processor = AutoProcessor.from_pretrained(pretrained, **load)
        self.tokenizer = self.processor.tokenizer
        self.batch_size_per_gpu = int(batch_size)
        self.budget = {}
        if max_image_tokens is not None:
            self.budget["max_image_tokens"] = int(max_image_tokens)
        if max_image_tokens_per_sample is not None:
            images_kwargs = type(self.processor).valid_processor_kwargs.__annotations__["images_kwargs"]
            if "max_image_tokens_per_sample" not in images_kwargs.__annotations__:
                raise ValueError(
                    "max_image_tokens_per_sample: this model's processor has no per-sample budget (saved with an "
                    "older nanoVLM); use max_image_tokens"
                )
            self.budget["max_image_tokens_per_sample"] = int(max_image_tokens_per_sample)
        self._rank, self._world_size = 0, 1

    @property
    def batch_size(self):
        return self.batch_size_per_gpu

    @property
    def device(self):
        return self._device

    def _prompt(self, context: str, num_images: int, answer: str | None = None) -> str:
        """The chat prompt for one request: its images, then its text, as the model was trained."""
        content = [{"type": "image"}] * num_images + [{"type": "text", "text": context}]
        messages = [{"role": "user", "content": content}]
        prompt = self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return prompt if answer is None else prompt + answer

    def _visuals(self, doc_to_visual, doc_id, task, split) -> list:
        visuals = doc_to_visual(self.task_dict[task][split][doc_id]) if doc_to_visual is not None else []
        return [visual for visual in (visuals or []) if visual is not None]

    def _inputs(self, texts: list[str], images: list[list]):
        has_images = any(images)
        inputs = self.processor(text=texts, images=images if has_images else None, padding=True,
                                padding_side="left", return_tensors="pt", **(self.budget if has_images else {}))
        return inputs.to(self._device)

    def generate_until(self, requests: list[Instance]) -> list[str]:
        results = []
        # One batch holds one task's requests with the same generation kwargs, longest first (lmms-eval's Collator),
        # answers returned in the requests' order.
        collator = utils.Collator([request.args for request in requests], lambda args: (-len(args[0]), args[0]),
                                  grouping=True)
        progress = tqdm(total=len(requests), disable=self.rank != 0, desc="nanovlm_hf generate")
        for chunk in collator.get_batched(n=self.batch_size, batch_fn=None):
            contexts, all_gen_kwargs, doc_to_visuals, doc_ids, tasks, splits = zip(*chunk)
            gen_kwargs = dict(all_gen_kwargs[0])
            until = gen_kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            images = [self._visuals(*args) for args in zip(doc_to_visuals, doc_ids, tasks, splits)]
            texts = [self._prompt(context, len(group)) for context, group in zip(contexts, images)]
            inputs = self._inputs(texts, images)
            temperature = float(gen_kwargs.pop("temperature", 0) or 0)
            generate = {
                "max_new_tokens": int(gen_kwargs.pop("max_new_tokens", 128)),
                "num_beams": int(gen_kwargs.pop("num_beams", 1) or 1),
                "do_sample": temperature > 0,
                "pad_token_id": self.tokenizer.pad_token_id,
            }
            if temperature > 0:
                generate["temperature"] = temperature
                if gen_kwargs.get("top_p") is not None:
                    generate["top_p"] = float(gen_kwargs["top_p"])
            with torch.inference_mode():
                output = self.model.generate(**inputs, **generate)
            answers = self.processor.batch_decode(output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
            for answer in answers:
                for stop in until:
                    if stop:
                        answer = answer.split(stop, 1)[0]
                results.append(answer)
            progress.update(len(chunk))
        progress.close()
        return collator.get_original(results)

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        """Sum of the continuation's token log-probabilities after the prompt, and whether greedy decoding gives it."""
        results = []
        for context, continuation, doc_to_visual, doc_id, task, split in [request.args for request in requests]:
            if not isinstance(continuation, str):
                continuation = continuation(self.task_dict[task][split][doc_id])
            images = [self._visuals(doc_to_visual, doc_id, task, split)]
            prompt = self._prompt(context, len(images[0]))
            full = self._inputs([prompt + continuation], images)
            prompt_length = self._inputs([prompt], images)["input_ids"].shape[1]
            with torch.inference_mode():
                logits = self.model(**full).logits[0, prompt_length - 1 : -1].float()
            targets = full["input_ids"][0, prompt_length:]
            log_probs = torch.log_softmax(logits, dim=-1)
            total = log_probs.gather(1, targets[:, None]).sum().item()
            results.append((total, bool((logits.argmax(dim=-1) == targets).all())))
        return results

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError("nanovlm_hf: multi-round generation is not implemented")
