"""The router's own tokenizer: the model's ``transformers.AutoTokenizer`` (TGI's router loads
the same one through pyo3). It counts prompt tokens for validation and block allocation, answers
``/tokenize`` and renders chat templates."""

from __future__ import annotations

from typing import Any

from .errors import TemplateError, ValidationError


class Tokenizer:
    def __init__(self, hf: Any) -> None:
        self.hf = hf
        # NOTE: the fast tokenizer's Rust object is what TGI's router uses; it is also ~5x faster
        # than the Python ``__call__`` path for short prompts.
        self._fast = getattr(hf, "_tokenizer", None)
        self._uses_tools: bool | None = None

    @classmethod
    def load(
        cls, model_id: str, revision: str | None = None, trust_remote_code: bool = False
    ) -> Tokenizer:
        from transformers import AutoTokenizer

        try:
            hf = AutoTokenizer.from_pretrained(
                model_id, revision=revision, trust_remote_code=trust_remote_code
            )
        except Exception as err:
            raise ValueError(f"could not load the tokenizer of {model_id!r}: {err}") from err
        return cls(hf)

    def _encoding(self, text: str, add_special_tokens: bool, release_gil: bool):
        # NOTE: tokenizers' ``encode`` holds the GIL (a 2 MB prompt stalls the event loop for
        # seconds even from a worker thread); ``encode_batch`` releases it.
        if release_gil:
            return self._fast.encode_batch([text], add_special_tokens=add_special_tokens)[0]
        return self._fast.encode(text, add_special_tokens=add_special_tokens)

    def encode(self, text: str, add_special_tokens: bool, release_gil: bool = False) -> list[int]:
        """Token ids; ``release_gil`` for long texts encoded in a worker thread."""
        try:
            if self._fast is not None:
                return self._encoding(text, add_special_tokens, release_gil).ids
            return self.hf.encode(text, add_special_tokens=add_special_tokens)
        except Exception as err:
            raise ValidationError(f"tokenizer error {err}") from err

    def tokenize(
        self, text: str, add_special_tokens: bool, release_gil: bool = False
    ) -> list[dict]:
        """``/tokenize``: ``[{id, text, start, stop}]`` with character offsets into ``text``."""
        if self._fast is None:
            raise ValidationError("No fast tokenizer available")
        try:
            enc = self._encoding(text, add_special_tokens, release_gil)
        except Exception as err:
            raise ValidationError(f"tokenizer error {err}") from err
        return [
            {"id": i, "text": text[start:stop], "start": start, "stop": stop}
            for i, (start, stop) in zip(enc.ids, enc.offsets)
        ]

    def decode(self, ids: list[int]) -> str:
        return self.hf.decode(ids, skip_special_tokens=True)

    def apply_chat_template(self, messages: list[dict], tools: list[dict] | None = None) -> str:
        if not getattr(self.hf, "chat_template", None):
            raise TemplateError("template not found")
        try:
            return self.hf.apply_chat_template(
                messages, tools=tools, tokenize=False, add_generation_prompt=True
            )
        except Exception as err:
            raise TemplateError(str(err)) from err

    @property
    def template_uses_tools(self) -> bool:
        """Whether the chat template reads a ``tools`` variable (else TGI writes the tools into
        the last message)."""
        if self._uses_tools is None:
            template = getattr(self.hf, "chat_template", None)
            self._uses_tools = False
            if isinstance(template, str):
                from jinja2 import Environment, TemplateError, meta

                try:
                    names = meta.find_undeclared_variables(Environment().parse(template))
                    self._uses_tools = "tools" in names
                except TemplateError:  # a template jinja2 cannot parse fails later, with its error
                    self._uses_tools = False
        return self._uses_tools
