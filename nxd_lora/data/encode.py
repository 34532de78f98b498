"""Turn chat messages into token ids and labels, masking the prompt (completion-only loss).

Templates: ``tokenizer`` (the jinja ``chat_template`` of tokenizer_config.json), ``llama3``
(Llama 3's chat format, for tiktoken ``tokenizer.model`` files, which carry no template) and
``alpaca`` (instruction / response text, for Llama 2 and other tokenizers). The prompt
is everything before the final assistant answer; its labels are -100 unless
``train_on_prompt``.
"""

from __future__ import annotations

from dataclasses import dataclass

from nxd_lora.data.records import Record
from nxd_lora.tokenizer import Tokenizer

IGNORE_INDEX = -100
TEMPLATES = ("auto", "tokenizer", "llama3", "alpaca")
ALPACA_HEADER = "Below is an instruction that describes a task. Write a response that completes the request.\n\n"


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    prompt_length: int
    source: str


def _llama3_prompt_and_answer(messages: list[dict[str, str]], tok: Tokenizer) -> tuple[list[int], list[int]]:
    start, end, eot = (tok.specials[t] for t in ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"))

    def header(role: str) -> list[int]:
        return [start, *tok.encode(role), end, *tok.encode("\n\n")]

    prompt = [tok.bos_id] if tok.bos_id is not None else []
    for m in messages[:-1]:
        prompt += header(m["role"]) + tok.encode(m["content"]) + [eot]
    prompt += header("assistant")
    return prompt, tok.encode(messages[-1]["content"]) + [eot]


def _alpaca_prompt_and_answer(messages: list[dict[str, str]], tok: Tokenizer) -> tuple[list[int], list[int]]:
    system = "".join(m["content"] + "\n\n" for m in messages[:-1] if m["role"] == "system")
    turns = [m for m in messages[:-1] if m["role"] != "system"]
    body = "".join(
        f"### Instruction:\n{m['content']}\n\n" if m["role"] == "user" else f"### Response:\n{m['content']}\n\n"
        for m in turns
    )
    prompt = tok.encode(ALPACA_HEADER + system + body + "### Response:\n", bos=True)
    return prompt, tok.encode(messages[-1]["content"], eos=True)


def _chat_template_prompt_and_answer(messages: list[dict[str, str]], tok: Tokenizer) -> tuple[list[int], list[int]]:
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    template = env.from_string(tok.chat_template)
    names = {v: k for k, v in tok.specials.items()}
    variables = {"bos_token": names.get(tok.bos_id, ""), "eos_token": names.get(tok.eos_id, "")}
    prompt = template.render(messages=messages[:-1], add_generation_prompt=True, **variables)
    full = template.render(messages=messages, add_generation_prompt=False, **variables)
    if not full.startswith(prompt) or messages[-1]["content"] not in full[len(prompt):]:
        raise ValueError("the tokenizer's chat_template does not render the conversation as prompt + answer; "
                         "choose template 'llama3' or 'alpaca'")
    answer = full[len(prompt):]
    eos = variables["eos_token"]
    if eos and answer.rstrip().endswith(eos):
        answer = answer.rstrip()  # the turn ends at eos; the template's newline after it is not learned
    return tok.encode(prompt, specials_in_text=True), tok.encode(answer, specials_in_text=True)


_BUILDERS = {"tokenizer": _chat_template_prompt_and_answer, "llama3": _llama3_prompt_and_answer,
             "alpaca": _alpaca_prompt_and_answer}


def resolve_template(template: str, tok: Tokenizer) -> str:
    if template not in TEMPLATES:
        raise ValueError(f"template {template!r} unknown; choose one of {list(TEMPLATES)}")
    if template == "auto":
        return "tokenizer" if tok.chat_template else "llama3" if tok.is_llama3_chat else "alpaca"
    if template == "tokenizer" and not tok.chat_template:
        raise ValueError("template 'tokenizer' needs a chat_template in tokenizer_config.json")
    if template == "llama3" and not tok.is_llama3_chat:
        raise ValueError("template 'llama3' needs a tokenizer with <|start_header_id|> and <|eot_id|>")
    return template


def encode_record(record: Record, tok: Tokenizer, template: str = "auto", train_on_prompt: bool = False) -> Encoded:
    prompt, answer = _BUILDERS[resolve_template(template, tok)](record.messages, tok)
    labels = (prompt if train_on_prompt else [IGNORE_INDEX] * len(prompt)) + answer
    return Encoded(prompt + answer, labels, len(prompt), record.source)


def encode_prompt(messages: list[dict[str, str]], tok: Tokenizer, template: str = "auto") -> list[int]:
    """The ids a model is given to generate the next assistant turn after ``messages``
    (the same prompt training masks, so generation sees what training saw)."""
    prompt, _ = _BUILDERS[resolve_template(template, tok)]([*messages, {"role": "assistant", "content": ""}], tok)
    return prompt
