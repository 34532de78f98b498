"""Records, schemas, templates with completion-only masking, packing with document masks."""

from __future__ import annotations

import json

import pytest
import torch

from checkpoint_tools.llama_config import LlamaConfig
from checkpoint_tools.tp_layout import shard_hf_state_dict
from conftest import LLAMA3_TINY, hf_state_dict, make_hf_model
from nxd_lora.data.batching import fit_to_length, pack, pad, real_token_fraction
from nxd_lora.data.encode import IGNORE_INDEX, encode_record
from nxd_lora.data.records import read_records, sample_data_path
from nxd_lora.lora.model import load_base_state_dict
from nxd_lora.model.llama import LlamaForCausalLM
from nxd_lora.tiny import write_sentencepiece, write_tiktoken_bytes
from nxd_lora.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def llama3_tok(tmp_path_factory):
    return load_tokenizer(write_tiktoken_bytes(tmp_path_factory.mktemp("tok") / "tokenizer.model"))


def test_three_schemas_and_three_file_types(tmp_path):
    (tmp_path / "d.jsonl").write_text(json.dumps({"instruction": "Q", "context": "C", "response": "A"}) + "\n\n")
    (tmp_path / "a.json").write_text(json.dumps([{"instruction": "Q", "input": "", "output": "A"}]))
    (tmp_path / "c.jsonl").write_text(json.dumps({"messages": [{"role": "system", "content": "S"},
                                                               {"role": "user", "content": "Q"},
                                                               {"role": "assistant", "content": "A"}]}) + "\n")
    (tmp_path / "d.csv").write_text("instruction,context,response\nQ,,A\n")
    assert read_records(tmp_path / "d.jsonl").records[0].messages == [
        {"role": "user", "content": "Q\n\nC"}, {"role": "assistant", "content": "A"}]
    assert read_records(tmp_path / "a.json").records[0].messages[0] == {"role": "user", "content": "Q"}
    assert [m["role"] for m in read_records(tmp_path / "c.jsonl").records[0].messages] == ["system", "user", "assistant"]
    assert read_records(tmp_path / "d.csv").records[0].source == f"{tmp_path / 'd.csv'}:2"


def test_malformed_rows_name_the_line_and_can_be_skipped(tmp_path):
    good = json.dumps({"instruction": "Q", "response": "A"})
    (tmp_path / "x.jsonl").write_text("\n".join([good, "{broken", json.dumps({"question": "?"}), good]) + "\n")
    with pytest.raises(ValueError, match=r"x.jsonl:2: invalid JSON"):
        read_records(tmp_path / "x.jsonl")
    report = read_records(tmp_path / "x.jsonl", on_error="skip")
    assert len(report.records) == 2 and len(report.skipped) == 2
    assert "x.jsonl:3: unknown schema" in report.skipped[1] and "dolly" in report.skipped[1]
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="empty.jsonl: no usable records"):
        read_records(tmp_path / "empty.jsonl")
    with pytest.raises(ValueError, match="unsupported data file type '.txt'"):
        (tmp_path / "x.txt").write_text("hi")
        read_records(tmp_path / "x.txt")


def test_sample_data_ships_with_the_package():
    records = read_records(sample_data_path()).records
    assert len(records) >= 40 and all(r.messages[-1]["role"] == "assistant" for r in records)


def test_llama3_template_masks_the_prompt(llama3_tok):
    record = read_records(sample_data_path()).records[0]
    ex = encode_record(record, llama3_tok)
    eot = llama3_tok.specials["<|eot_id|>"]
    assert ex.input_ids[0] == llama3_tok.bos_id and ex.input_ids[-1] == eot
    assert ex.labels[: ex.prompt_length] == [IGNORE_INDEX] * ex.prompt_length
    assert ex.labels[ex.prompt_length:] == ex.input_ids[ex.prompt_length:]
    assert llama3_tok.decode(ex.input_ids[ex.prompt_length:-1]) == record.messages[-1]["content"]
    header = llama3_tok.decode(ex.input_ids[: ex.prompt_length])
    assert header.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert encode_record(record, llama3_tok, train_on_prompt=True).labels == ex.input_ids


def test_alpaca_template_for_sentencepiece(tmp_path):
    texts = [m["content"] for r in read_records(sample_data_path()).records for m in r.messages]
    tok = load_tokenizer(write_sentencepiece(tmp_path / "tokenizer.model", texts))
    record = read_records(sample_data_path()).records[3]
    ex = encode_record(record, tok)
    assert ex.input_ids[0] == tok.bos_id and ex.input_ids[-1] == tok.eos_id
    assert "### Response:" in tok.decode(ex.input_ids[: ex.prompt_length])
    with pytest.raises(ValueError, match="template 'llama3' needs"):
        encode_record(record, tok, template="llama3")


def test_seq_len_smaller_than_a_prompt(llama3_tok):
    examples = [encode_record(r, llama3_tok) for r in read_records(sample_data_path()).records[:5]]
    short = min(e.prompt_length for e in examples)
    with pytest.raises(ValueError, match=r"instructions.jsonl:\d+: prompt is \d+ tokens, seq_len is"):
        fit_to_length(examples, short)
    kept, report = fit_to_length(examples, short + 3, on_long_prompt="skip")
    assert all(len(e.input_ids) <= short + 3 for e in kept) and len(kept) + len(report.dropped) == 5
    assert report.truncated


def test_packing_keeps_every_token_and_beats_padding(llama3_tok):
    examples = [encode_record(r, llama3_tok) for r in read_records(sample_data_path()).records]
    examples, _ = fit_to_length(examples, 512)
    packed, padded = pack(examples, 512, llama3_tok.pad_id), pad(examples, 512, llama3_tok.pad_id)
    assert len(packed) < len(padded)
    assert real_token_fraction(packed) > 2 * real_token_fraction(padded)
    real = [t for r in packed for t, d in zip(r["input_ids"].tolist(), r["document_ids"].tolist()) if d > 0]
    assert sorted(real) == sorted(t for e in examples for t in e.input_ids)
    for row in packed:
        starts = (row["position_ids"] == 0).nonzero().flatten().tolist()
        assert len(starts) >= int(row["document_ids"].max())  # positions restart per document


@pytest.mark.smoke
def test_packed_row_gives_the_same_logits_as_each_document_alone():
    cfg = LlamaConfig.from_dict(LLAMA3_TINY)
    model = LlamaForCausalLM(cfg, tp_size=1)
    load_base_state_dict(model, shard_hf_state_dict(hf_state_dict(make_hf_model(LLAMA3_TINY)), cfg, 1)[0])
    gen = torch.Generator().manual_seed(0)
    docs = [torch.randint(0, 64, (n,), generator=gen) for n in (7, 5, 9)]
    from nxd_lora.data.encode import Encoded

    row = pack([Encoded(d.tolist(), d.tolist(), 0, "x") for d in docs], 24, pad_id=0)[0]
    with torch.no_grad():
        packed, _ = model(row["input_ids"][None], position_ids=row["position_ids"][None],
                          document_ids=row["document_ids"][None])
        offset = 0
        for d in docs:
            alone, _ = model(d[None])
            torch.testing.assert_close(packed[0, offset:offset + len(d)], alone[0], atol=1e-5, rtol=0)
            offset += len(d)


CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)


def test_tokenizer_chat_template_is_rendered_with_masked_prompt(tmp_path):
    from nxd_lora.tiny import write_hf_tokenizer

    texts = [m["content"] for r in read_records(sample_data_path()).records for m in r.messages]
    write_hf_tokenizer(tmp_path, texts)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(dict(config, chat_template=CHAT_TEMPLATE)))
    tok = load_tokenizer(tmp_path)
    record = read_records(sample_data_path()).records[2]
    ex = encode_record(record, tok)  # auto picks the tokenizer's template
    eot, start = tok.specials["<|eot_id|>"], tok.specials["<|start_header_id|>"]
    assert ex.input_ids[0] == tok.bos_id and ex.input_ids[-1] == eot  # specials became ids
    assert ex.input_ids[: ex.prompt_length].count(start) == 2  # user turn + generation prompt
    assert ex.labels[: ex.prompt_length] == [IGNORE_INDEX] * ex.prompt_length
    assert tok.decode(ex.input_ids[ex.prompt_length:-1]) == record.messages[-1]["content"]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(dict(config, chat_template="{{ messages[0]['content'] }}")))
    with pytest.raises(ValueError, match="does not render the conversation as prompt \\+ answer"):
        encode_record(record, load_tokenizer(tmp_path))
