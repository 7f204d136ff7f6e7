"""The tokenizer side every engine shares: stop tokens, response text, and prompt rendering.

A prompt must be the same token ids under every engine (DESIGN section 3: the chat template is part
of the estimand), so the rendering lives here once; the transformers, vLLM and OpenAI-compatible
engines only differ in how they sample and score those ids.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Iterable, Sequence

from tailmon.engines.base import Engine, Variant
from tailmon.errors import InputError

# Bounded: a daemon renders new production prompts every run, and an LLM judge renders a new
# prompt per response; an unbounded cache would grow for the life of the process.
PROMPT_CACHE_SIZE = 1024
# Where a model's configuration states its context length (the first present is used).
CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")


def context_length(config) -> int | None:
    """The context length a transformers model config states, or None."""
    for key in CONTEXT_KEYS:
        value = getattr(config, key, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


class ChatEngine(Engine):
    """An engine over a transformers tokenizer with a chat template. Subclasses call `_init_chat`."""

    def _init_chat(self, tokenizer, model_id: str, stops: Iterable[int], max_context: int | None = None) -> None:
        """`max_context`: the model's context length in tokens (prompt and response), or None
        when unknown (then prompts are not checked against it)."""
        self.tokenizer = tokenizer
        self.max_context = max_context
        self._model_id = model_id
        self._stops = frozenset(int(s) for s in stops)
        if not self._stops:
            raise InputError(f"model {model_id}: the tokenizer defines no EOS token, so responses could never end")
        self._pad = min(self._stops)  # filler after a finished response; never scored
        self._prompt_cache: OrderedDict[tuple[str, str | None], list[int]] = OrderedDict()

    @property
    def model_id(self) -> str:
        return self._model_id

    @property
    def stop_token_ids(self) -> frozenset[int]:
        return self._stops

    def decode(self, token_ids: Sequence[int]) -> str:
        # Stop tokens end the response and are not part of its text; any other special token the
        # model emits stays visible as text (and so every non-stop token has a non-empty text,
        # which keeps exact prefix computations finite).
        ids = [t for t in token_ids if t not in self._stops]
        return self.tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def token_text(self, token_id: int) -> str:
        return self.decode([token_id])

    def rendered(self, prompt: str, variant: Variant) -> list[int]:
        """`prompt_ids` for a variant, checked against the model's context (`check_prompt`)."""
        ids = self.prompt_ids(prompt, variant.system_prompt)
        need = len(ids) + variant.decoding.max_new_tokens
        if self.max_context is not None and need > self.max_context:
            # A model past its context either fails in the middle of a run or, with positions it
            # was never trained on, runs for minutes and answers garbage: refuse it up front.
            raise InputError(
                f"a prompt of {len(ids)} tokens ({len(prompt)} characters, rendered with the chat template) "
                f"and max_new_tokens={variant.decoding.max_new_tokens} exceed the context of model "
                f"{self._model_id} ({self.max_context} tokens): shorten the prompt (a source's prompts.max_chars "
                "leaves long ones out) or lower max_new_tokens")
        return ids

    def check_prompt(self, prompt: str, variant: Variant) -> None:
        self.rendered(prompt, variant)

    def prompt_ids(self, prompt: str, system_prompt: str | None = None) -> list[int]:
        """Token ids of the prompt as production serves it: one rendering for sampler and scorer."""
        key = (prompt, system_prompt)
        if key in self._prompt_cache:
            self._prompt_cache.move_to_end(key)
            return self._prompt_cache[key]
        if getattr(self.tokenizer, "chat_template", None):
            messages = [{"role": "system", "content": system_prompt}] if system_prompt is not None else []
            messages.append({"role": "user", "content": prompt})
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        else:
            if system_prompt is not None:
                raise InputError(f"model {self._model_id} has no chat template, so it has no system prompt to vary")
            text = prompt
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if not ids:
            raise InputError("the rendered prompt is empty")
        self._prompt_cache[key] = list(ids)
        if len(self._prompt_cache) > PROMPT_CACHE_SIZE:
            self._prompt_cache.popitem(last=False)
        return self._prompt_cache[key]
