"""Chat templates for nanoVLM's processor: ChatML with image parts (`CHAT_TEMPLATE`), and any LM's own template
wrapped to take image parts and to mark the answers with `{% generation %}` (`chat_template_for`), checked to render
text-only conversations as the LM's tokenizer does (`check_chat_template`).

Exported with the processor (a flat sibling it imports relatively).
"""

import re

GENERATION_MARK = re.compile(r"\{%-?\s*generation\s*-?%\}")  # as transformers and TRL look for it

# ChatML, as SmolLM2 uses. Content may be a string or a list of {"type": "image"} / {"type": "text"} parts;
# each image part becomes one <image> placeholder, expanded by the processor. `{% generation %}` marks what a model
# learns to say -- each assistant answer and its closing <|im_end|>, not the newline after it -- so that
# `apply_chat_template(..., return_assistant_tokens_mask=True)` returns it as `assistant_masks` (NanoVLMCollator's
# labels, TRL's `assistant_only_loss`).
CHAT_TEMPLATE = (
    "{% macro render_content(content) %}"
    "{% if content is string %}{{ content }}"
    "{% else %}{% for part in content %}"
    "{% if part['type'] == 'image' %}{{ '<image>' }}{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{% endmacro %}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ render_content(message['content']) + '<|im_end|>' }}{% endgeneration %}"
    "{% else %}{{ render_content(message['content']) + '<|im_end|>' }}{% endif %}"
    "{{ '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


# An LM's own chat template, kept: `chat_template_for` wraps it so that it also takes image parts and marks the
# assistant's answers with `{% generation %}`, while a text-only conversation renders exactly as the LM's tokenizer
# renders it (its default system prompt included). Before the LM's template runs, list contents become strings
# (an image part -> `<image>`) and each assistant answer is bracketed by two control characters (inside its
# leading and trailing whitespace, so that a template that trims contents renders the same); the LM's output is
# captured, and the brackets are replaced by a `{% generation %}` block holding the answer and the end-of-turn token
# that follows it (the span CHAT_TEMPLATE marks).
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "</s>", "<|endoftext|>")
_TEMPLATE_BEFORE = (
    "{%- set nanovlm = namespace(messages=[]) -%}"
    "{%- for message in messages -%}"
    "{%- set content = message['content'] -%}"
    "{%- if content is not none and content is not string -%}"
    "{%- set text = namespace(value='') -%}"
    "{%- for part in content -%}"
    "{%- if part['type'] == 'image' -%}{%- set text.value = text.value + '<image>' -%}"
    "{%- elif part['type'] == 'text' -%}{%- set text.value = text.value + part['text'] -%}{%- endif -%}"
    "{%- endfor -%}"
    "{%- set content = text.value -%}"
    "{%- endif -%}"
    "{%- if message['role'] == 'assistant' and content is string and nanovlm_mark_answers -%}"
    "{%- set core = content.strip() -%}"
    "{%- set lead = (content | length) - (content.lstrip() | length) -%}"
    "{%- set content = content[:lead] + '\\x02' + core + '\\x03' + content[lead + (core | length):] -%}"
    "{%- endif -%}"
    "{%- set nanovlm.messages = nanovlm.messages + [dict(message, content=content)] -%}"
    "{%- endfor -%}"
    "{%- set messages = nanovlm.messages -%}"
)
_TEMPLATE_AFTER = (
    "{%- set nanovlm_pieces = nanovlm_rendered.split('\\x02') -%}"
    "{{- nanovlm_pieces[0] -}}"
    "{%- for piece in nanovlm_pieces[1:] -%}"
    "{%- set answer, rest = (piece.split('\\x03', 1) + [''])[:2] -%}"
    "{%- set turn = namespace(end='') -%}"
    "{%- for token in nanovlm_end_of_turn -%}"
    "{%- if not turn.end and rest.lstrip().startswith(token) -%}"
    "{%- set turn.end = rest[:(rest | length) - (rest.lstrip() | length) + (token | length)] -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- generation -%}{{- answer + turn.end -}}{%- endgeneration -%}"
    "{{- rest[(turn.end | length):] -}}"
    "{%- endfor -%}"
)


def chat_template_for(tokenizer) -> str:
    """The processor's chat template for `tokenizer`: the LM's own template, wrapped to take image parts and to mark
    the answers with `{% generation %}`; `CHAT_TEMPLATE` when the tokenizer has none. A template that already marks
    its answers only gains the image parts."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # several named templates: the default one is what apply_chat_template uses
        template = template.get("default")
    if not template:
        return CHAT_TEMPLATE
    # Jinja drops one trailing newline of a template (keep_trailing_newline=False); inside the capture it would stay
    if template.endswith("\n"):
        template = template[:-1]
    if GENERATION_MARK.search(template):
        return "{%- set nanovlm_mark_answers = false -%}" + _TEMPLATE_BEFORE + template
    vocab = tokenizer.get_vocab()
    ends = [token for token in (tokenizer.eos_token, *END_OF_TURN_TOKENS) if token and token in vocab]
    ends = list(dict.fromkeys(ends))
    return (
        "{%- set nanovlm_mark_answers = true -%}"
        f"{{%- set nanovlm_end_of_turn = {ends!r} -%}}"
        + _TEMPLATE_BEFORE
        + "{% set nanovlm_rendered %}" + template + "{% endset %}"
        + _TEMPLATE_AFTER
    )


# Conversations `check_chat_template` renders both ways: the shapes a template branches on (first message a system
# prompt or not, several turns, with and without the generation prompt).
_PROBES = (
    [{"role": "user", "content": "Hi there."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 2?"}],
    [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": " Blue, say.\n"},
     {"role": "user", "content": "Another?"}],
    [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}],
)


def check_chat_template(tokenizer, chat_template: str) -> None:
    """A `ValueError` unless `chat_template` renders text-only conversations exactly as `tokenizer` does."""
    from transformers.utils.chat_template_utils import render_jinja_template

    for messages in _PROBES:
        for add_generation_prompt in (False, True):
            try:
                expected = tokenizer.apply_chat_template(
                    messages, tokenize=False, add_generation_prompt=add_generation_prompt
                )
            except Exception:  # a conversation this LM's template refuses (roles, order): nothing to compare
                continue
            (found,), _ = render_jinja_template(
                [messages], chat_template=chat_template, add_generation_prompt=add_generation_prompt,
                **tokenizer.special_tokens_map,
            )
            if found != expected:
                raise ValueError(
                    "nanoVLM could not adapt this LM's chat template to images: a text-only conversation renders as "
                    f"{found!r} instead of the tokenizer's {expected!r}; pass chat_template= (with image parts and "
                    "{% generation %} marks) to NanoVLMProcessor.from_backbones"
                )
