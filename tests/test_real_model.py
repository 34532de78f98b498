"""The real pretrained model (SmolLM2-135M-Instruct, fetched at set-up): conversion, numerics at
TP=1 and TP=3 against transformers, the TP rules, and its tokenizer and chat template."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from checkpoint_tools.convert import convert_to_hf, convert_to_nxd
from checkpoint_tools.llama_config import LlamaConfig
from checkpoint_tools.nxd_format import BASE_TAG, read_manifest
from nxd_lora.data.batching import pad
from nxd_lora.data.encode import IGNORE_INDEX, encode_prompt, encode_record
from nxd_lora.data.records import Record
from nxd_lora.demo import trained_logits
from nxd_lora.local_launch import spawn_ranks
from nxd_lora.tokenizer import load_tokenizer

pytestmark = pytest.mark.slow

# fp32 through 30 layers: TP changes the order of the row-parallel sums, nothing else.
LOGIT_ATOL = 1e-3
CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}, {"role": "assistant", "content": "Paris."}],
    [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "Colour of the sky?"},
     {"role": "assistant", "content": "Blue."}],
    [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello. How can I help?"},
     {"role": "user", "content": "Name a prime number."}, {"role": "assistant", "content": "Seven."}],
]


def hf_shard(directory):
    return load_file(str(directory / "model-00001-of-00001.safetensors"))


def test_gguf_to_hf_equals_transformers_dequantized_state_dict(smollm2_gguf, smollm2_hf):
    import transformers

    reference = transformers.AutoModelForCausalLM.from_pretrained(str(smollm2_gguf.parent),
                                                                  gguf_file=smollm2_gguf.name)
    theirs = reference.state_dict()
    ours = hf_shard(smollm2_hf)
    assert reference.config.tie_word_embeddings and set(theirs) - set(ours) == {"lm_head.weight"}
    assert len(ours) == 272
    for key, value in ours.items():
        assert value.dtype == torch.float32 and torch.equal(value, theirs[key]), key
    config = json.loads((smollm2_hf / "config.json").read_text())
    for field in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "rms_norm_eps", "tie_word_embeddings", "max_position_embeddings"):
        assert config[field] == getattr(reference.config, field), field
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["vocab_size"]) == (9, 3, 49152)
    generation = json.loads((smollm2_hf / "generation_config.json").read_text())
    assert generation["eos_token_id"] == 2 and generation["bos_token_id"] == 1


def test_our_model_at_tp1_and_tp3_gives_transformers_logits(smollm2_hf, smollm2_tp3, tmp_path):
    import transformers

    tok = load_tokenizer(smollm2_hf)
    ids = torch.tensor([encode_record(Record(CONVERSATIONS[1], "test"), tok).input_ids])
    reference = transformers.LlamaForCausalLM.from_pretrained(smollm2_hf).eval()
    with torch.no_grad():
        expected = reference(input_ids=ids).logits[0]
    convert_to_nxd(smollm2_hf, tmp_path / "tp1", 1, log=lambda _: None)
    for ckpt, tp in ((tmp_path / "tp1", 1), (smollm2_tp3, 3)):
        logits = spawn_ranks(trained_logits, tp, str(ckpt), None, tp, ids)[0][0]
        assert logits.shape == expected.shape
        assert (logits - expected).abs().max() < LOGIT_ATOL, f"tp={tp}"
        assert torch.equal(logits.argmax(-1), expected.argmax(-1)), f"tp={tp}"


@pytest.mark.parametrize("fuse_qkv", [False, True])
def test_hf_to_nxd_tp3_to_hf_is_bit_exact(smollm2_hf, tmp_path, fuse_qkv, request):
    # The session's TP=3 conversions of smollm2_hf (convert_to_nxd, as the other readers use them).
    nxd = request.getfixturevalue("smollm2_tp3_fused" if fuse_qkv else "smollm2_tp3")
    manifest = read_manifest(nxd / BASE_TAG)
    assert manifest["tp"] == 3 and manifest["fuse_qkv"] is fuse_qkv and manifest["source"]["path"] == str(smollm2_hf)
    assert manifest["kv_size_multiplier"] == 1 and manifest["source"]["format"] == "hf-safetensors"
    assert (nxd / "tokenizer.json").is_file()  # train finds the tokenizer beside the weights
    rank0 = torch.load(nxd / "pretrained_weight" / "model" / "dp_rank_00_tp_rank_00_pp_rank_00.pt",
                       weights_only=True)
    k_key = "model.layers.0.self_attn.qkv_proj.weight_" + ("qkv" if fuse_qkv else "k")
    assert rank0[k_key].shape[0] == (192 + 64 * 2 if fuse_qkv else 64)  # one KV head per rank (+ 3 Q heads)
    convert_to_hf(nxd, tmp_path / "back", log=lambda _: None)
    original, back = hf_shard(smollm2_hf), hf_shard(tmp_path / "back")
    assert set(original) == set(back)
    for key in original:
        assert torch.equal(original[key], back[key]), key


@pytest.mark.parametrize("tp, named", [
    (2, ["num_attention_heads=9 is not divisible by tp=2", "num_key_value_heads=3"]),
    (9, ["vocab_size=49152 is not divisible by tp=9", "intermediate_size=1536 is not divisible by tp=9"]),
])
def test_tp_sizes_that_do_not_divide_are_refused(smollm2_hf, tmp_path, tp, named):
    with pytest.raises(ValueError) as err:
        convert_to_nxd(smollm2_hf, tmp_path / "out", tp, log=lambda _: None)
    for text in named:
        assert text in str(err.value)
    assert not (tmp_path / "out").exists()


def test_chatml_template_renders_as_transformers_does(smollm2_hf):
    import transformers

    theirs = transformers.AutoTokenizer.from_pretrained(smollm2_hf)
    tok = load_tokenizer(smollm2_hf)
    assert tok.chat_template == theirs.chat_template and "<|im_start|>" in tok.chat_template
    for messages in CONVERSATIONS:
        prompt = theirs.apply_chat_template(messages[:-1], add_generation_prompt=True, tokenize=False)
        full = theirs.apply_chat_template(messages, tokenize=False)
        assert full.startswith(prompt) and full.endswith("<|im_end|>\n")
        encoded = encode_record(Record(messages, "test"), tok)
        assert encode_prompt(messages[:-1], tok) == theirs(prompt, add_special_tokens=False)["input_ids"]
        # Training ends the sequence at <|im_end|>: the template's newline after it is not learned.
        assert encoded.input_ids == theirs(full.removesuffix("\n"), add_special_tokens=False)["input_ids"]


def test_completion_mask_is_exactly_the_assistant_turn(smollm2_hf):
    tok = load_tokenizer(smollm2_hf)
    for messages in CONVERSATIONS:
        encoded = encode_record(Record(messages, "test"), tok)
        learned = [t for t, label in zip(encoded.input_ids, encoded.labels) if label != IGNORE_INDEX]
        assert learned == encoded.input_ids[encoded.prompt_length:]
        assert tok.decode(learned) == messages[-1]["content"] + "<|im_end|>"
        assert learned[-1] == tok.eos_id == 2
        assert tok.decode(encoded.input_ids[:encoded.prompt_length]).endswith("<|im_start|>assistant\n")


def test_pad_is_distinct_from_eos_and_never_learned(smollm2_hf):
    tok = load_tokenizer(smollm2_hf)
    # The tokenizer's own pad is <|im_end|> (= eos); padding with it would teach the model to stop early.
    assert json.loads((smollm2_hf / "tokenizer_config.json").read_text())["pad_token"] == "<|im_end|>"
    assert tok.eos_id == 2 and tok.pad_id == 0 and tok.decode([0, 2]) == "<|im_end|>"  # pad is dropped
    examples = [encode_record(Record(m, "test"), tok) for m in CONVERSATIONS]
    rows = pad(examples, 96, tok.pad_id)
    for row, example in zip(rows, examples):
        n = len(example.input_ids)
        assert (row["input_ids"][n:] == tok.pad_id).all() and (row["labels"][n:] == IGNORE_INDEX).all()
        assert row["labels"][n - 1] == tok.eos_id


def test_generation_stops_at_the_generation_config_eos(smollm2_hf, tmp_path):
    import shutil

    assert load_tokenizer(smollm2_hf).stop_ids == (2,)
    copy = tmp_path / "tok"
    copy.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(smollm2_hf / name, copy / name)
    (copy / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    assert load_tokenizer(copy).stop_ids == (2, 0)
    (copy / "generation_config.json").write_text(json.dumps({"eos_token_id": "two"}))
    with pytest.raises(ValueError, match=r"generation_config\.json: eos_token_id must be an id or a list"):
        load_tokenizer(copy)


def test_real_config_reads_back(smollm2_hf):
    config = LlamaConfig.from_json(smollm2_hf)
    assert config.head_dim == 64 and config.tie_word_embeddings and config.rope_scaling is None
