"""The shipped tiny model loads offline with stock transformers and predicts held-out text."""

from __future__ import annotations

import json
import math

import pytest
import torch

transformers = pytest.importorskip("transformers")

import kvpolar.assets as assets


@pytest.fixture(scope="module")
def model_and_tokenizer():
    path = assets.tiny_model_path()
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    return model, tokenizer


def test_files_and_config():
    path = assets.tiny_model_path()
    for name in ("config.json", "tokenizer.json", "README.md", "model.safetensors.index.json"):
        assert (path / name).is_file(), name
    config = transformers.AutoConfig.from_pretrained(path)
    assert config.model_type == "llama"
    assert config.max_position_embeddings >= 2048
    assert config.num_attention_heads % config.num_key_value_heads == 0
    weights = sum(p.stat().st_size for p in path.glob("*.safetensors"))
    assert weights < 26e6  # 16-bit weights, small enough to ship


def test_tokenizer_round_trip(model_and_tokenizer):
    _, tokenizer = model_and_tokenizer
    text = "In the beginning God created the heaven and the earth. def f(x): return x ** 2"
    ids = tokenizer(text).input_ids
    assert ids[0] == tokenizer.bos_token_id
    assert tokenizer.decode(ids, skip_special_tokens=True) == text


def test_heldout_perplexity_matches_model_card(model_and_tokenizer):
    """Six 512-token windows spread over the held-out stream: perplexity near the card's figure."""
    model, tokenizer = model_and_tokenizer
    summary = json.loads((assets.tiny_model_path() / "training_summary.json").read_text())
    card_ppl = summary["heldout"]["512"]["ppl"]
    ids = [i for d in assets.heldout_documents() for i in tokenizer(d["text"], verbose=False).input_ids]
    length, windows = 512, 6
    stride = (len(ids) - length) // (windows - 1)
    x = torch.tensor([ids[k * stride : k * stride + length] for k in range(windows)])
    with torch.no_grad():
        logits = model(input_ids=x).logits
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
    ppl = math.exp(float(nll))
    # a uniform guess scores the vocabulary size (8192); the card's figure is over all windows
    assert ppl < 1.5 * card_ppl, (ppl, card_ppl)
    assert ppl > 1.0


def test_greedy_generation_runs(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    inputs = tokenizer("And God said,", return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    assert out.shape[1] == inputs.input_ids.shape[1] + 8
