"""search_llm on a small random Llama: width, depth and bits searched within a perplexity limit."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("transformers")
pytest.importorskip("optuna")

from torchslim.errors import ConfigError  # noqa: E402
from torchslim.graph.state import state_digest  # noqa: E402
from torchslim.search.llm import LLMSearchConfig, search_llm, storage_bytes  # noqa: E402


def _bytes(text: str) -> list[int]:
    return list(text.encode("utf-8"))


@pytest.fixture
def tiny(llama_spec):
    import torchslim as ts

    return ts.create_model(llama_spec(layers=4)).eval()


def _small(**kw):
    base = dict(trials=2, depth=(0.0, 0.25), width=(0.0, 0.2), int8_layers=(0, 1), perplexity_tokens=64,
                max_perplexity_increase=0.5, method="rtn")
    return {**base, **kw}


def test_search_returns_the_smallest_trial_within_the_limit_and_leaves_the_model_alone(tiny, tmp_path) -> None:
    before = state_digest(tiny)
    result = search_llm(tiny, "shakespeare", out=tmp_path / "s", tokenizer=_bytes, progress=False, **_small())
    assert state_digest(tiny) == before
    names = [t.name for t in result.trials]
    assert names[:4] == ["uniform int8", "uniform int4", "uniform width30+int4", "uniform depth30+int4"]
    assert len(result.trials) == 6
    feasible = [t for t in result.trials if t.perplexity <= result.reference["perplexity"] * 1.5]
    assert [t.name for t in result.trials if t.feasible] == [t.name for t in feasible]
    assert result.best is not None and result.best.bytes == min(t.bytes for t in feasible)
    by = {t.name: t for t in result.trials}
    assert by["uniform int4"].bytes < by["uniform int8"].bytes < result.reference["bytes"]
    assert by["uniform depth30+int4"].non_embedding_removed > 0.2
    assert set(result.front) <= set(names) and result.front
    saved = json.loads((tmp_path / "s" / "trials.json").read_text())
    assert saved["best"]["name"] == result.best.name and len(saved["trials"]) == 6
    assert storage_bytes(result.model) == result.best.bytes  # the returned model is the chosen configuration
    assert len(result.reference["sensitivity"]) == 4
    assert "uniform int4" in str(result.table())


def test_a_resumed_study_does_not_measure_its_trials_again(tiny, tmp_path) -> None:
    first = search_llm(tiny, "shakespeare", out=tmp_path / "s", tokenizer=_bytes, progress=False, **_small(uniform=False))
    again = search_llm(tiny, "shakespeare", out=tmp_path / "s", tokenizer=_bytes, progress=False,
                       **_small(uniform=False, trials=3))
    assert [t.name for t in again.trials[:2]] == [t.name for t in first.trials]
    assert [t.bytes for t in again.trials[:2]] == [t.bytes for t in first.trials]
    assert len(again.trials) == 3


@pytest.mark.parametrize("bad, word", [({"objective": "accuracy"}, "objective must be one of bytes, tokens_per_s"),
                                       ({"bits": (3,)}, "bits must list 4 and/or 8"),
                                       ({"method": "gptq"}, "method must be hqq or rtn"),
                                       ({"max_perplexity_increase": 0}, "max_perplexity_increase must be")])
def test_bad_settings_are_refused_in_one_line(bad, word) -> None:
    with pytest.raises(ConfigError, match=word):
        LLMSearchConfig(**bad)


def test_data_without_text_is_refused(tiny) -> None:
    with pytest.raises(ConfigError, match="perplexity on text"):
        search_llm(tiny, "digits", trials=0, progress=False)


def test_storage_bytes_counts_a_tied_table_once() -> None:
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    m = transformers.LlamaForCausalLM(cfg)
    unique = {p.data_ptr(): p.numel() * 4 for p in m.parameters()}
    assert storage_bytes(m) == sum(unique.values()) + sum(b.numel() * b.element_size() for b in m.buffers())
    assert m.lm_head.weight is m.model.embed_tokens.weight


def test_cli_search_of_a_decoder_llm_prints_the_table_and_saves_the_best(llama_spec, tmp_path, monkeypatch, capsys) -> None:
    import torchslim.lm
    import torchslim.lm.evaluate as evaluate
    from torchslim.cli import main

    def bytes_tokenizer(model, tokenizer=None):
        return tokenizer if tokenizer is not None else _bytes

    monkeypatch.setattr(evaluate, "resolve_tokenizer", bytes_tokenizer)
    monkeypatch.setattr(torchslim.lm, "resolve_tokenizer", bytes_tokenizer)
    spec = llama_spec(layers=4)
    out = tmp_path / "s"
    rc = main(["search", spec, "--data", "shakespeare", "--trials", "1", "--max-perplexity-increase", "0.5",
               "--out", str(out), "--json", "--no-progress"])
    assert rc == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["best"] is not None and payload["files"]["model"] == str(out / "model")
    assert len(payload["trials"]) == 5 and (out / "trials.json").exists()
    import torchslim as ts

    again = ts.load(out / "model")  # the chosen configuration replays (pruning + quantization)
    assert storage_bytes(again) == payload["best"]["bytes"]
    assert main(["search", spec, "--data", "shakespeare", "--max-perplexity-increase", "0", "--out",
                 str(tmp_path / "t")]) == 2


def test_a_configuration_that_cannot_be_built_is_reported_and_never_chosen(tiny, tmp_path, monkeypatch) -> None:
    import importlib

    llm = importlib.import_module("torchslim.search.llm")
    real = llm._apply

    def refuse_width(model, data, choice, *args, **kwargs):
        if choice["width"]:
            raise ConfigError("no width on the grid near 0.300")
        return real(model, data, choice, *args, **kwargs)

    monkeypatch.setattr(llm, "_apply", refuse_width)
    result = search_llm(tiny, "shakespeare", out=tmp_path / "s", tokenizer=_bytes, progress=False,
                        **_small(trials=0))
    bad = [t for t in result.trials if t.error is not None]
    assert [t.name for t in bad] == ["uniform width30+int4"] and not bad[0].feasible
    assert result.best is not None and result.best.error is None and "uniform width30+int4" not in result.front
    saved = json.loads((tmp_path / "s" / "trials.json").read_text())  # strict JSON: no Infinity
    assert [t["perplexity"] for t in saved["trials"] if t["error"]] == [None]
    assert "not built" in str(result.table())


def test_speed_objective_times_every_trial_as_the_decoder_it_ships(llama_spec, tmp_path) -> None:
    """objective="tokens_per_s" exports each trial as the int4 ONNX decoder and times it. A tied
    table at 4 bits cannot be shared with the head there (the decoder shares only an 8-bit one), so
    such a trial gets a head of its own instead of failing to build."""
    import torchslim as ts

    tied = ts.create_model(llama_spec(tie=True, layers=2)).eval()
    result = search_llm(tied, "shakespeare", tokenizer=_bytes, progress=False,
                        **_small(objective="tokens_per_s", trials=1, depth=(0.0,), width=(0.0,), head_bits=("4",)))
    assert [t.error for t in result.trials] == [None] * len(result.trials)
    assert all(t.tokens_per_s and t.tokens_per_s > 0 for t in result.trials)
    sampled = result.trials[-1]
    assert sampled.name == "trial 0" and sampled.choice["embedding_bits"] == 4
    assert result.best is not None and result.best.tokens_per_s == max(t.tokens_per_s for t in result.trials if t.feasible)


def test_the_front_holds_every_trial_no_other_beats_in_both_measures() -> None:
    from torchslim.search.llm import LLMTrial, _front

    def trial(name, size, ppl, speed):
        return LLMTrial(name=name, choice={}, bytes=size, perplexity=ppl, increase=0.0, feasible=True, tokens_per_s=speed)

    trials = [trial("small, worse", 70, 160.0, 140.0), trial("big, best", 90, 63.0, 120.0),
              trial("smallest, worst", 60, 530.0, 160.0), trial("dominated", 95, 100.0, 60.0)]
    assert _front(trials, speed=False) == ["small, worse", "big, best", "smallest, worst"]
    assert _front(trials, speed=True) == ["small, worse", "big, best", "smallest, worst"]
    trials.append(LLMTrial(name="broken", choice={}, bytes=1, perplexity=1.0, increase=0.0, feasible=False,
                           error="not built"))
    assert "broken" not in _front(trials, speed=False)


def test_heal_minutes_heals_the_chosen_pruning_then_quantizes_it_as_chosen(tiny, tmp_path) -> None:
    """heal_minutes > 0: the chosen pruned configuration is distilled from the original, then
    quantized as the trial was; the returned model is the healed one."""
    before = state_digest(tiny)
    cfg = _small(uniform=False, trials=1, depth=(0.25,), width=(0.2,), bits=(4,), int8_layers=(0,), head_bits=("8",),
                 max_perplexity_increase=10.0, heal_minutes=0.05)
    result = search_llm(tiny, "shakespeare", out=tmp_path / "s", tokenizer=_bytes, progress=False, **cfg)
    assert state_digest(tiny) == before
    assert result.best is not None and result.best.choice["depth"] and result.best.choice["width"]
    heal = result.heal
    assert "skipped" not in heal and heal["result"]["steps"] >= 1
    assert heal["bytes"] == storage_bytes(result.model) == result.best.bytes  # the same shape and bits as the trial
    assert len(result.model.model.layers) < len(tiny.model.layers)
    assert heal["perplexity"] > 1 and heal["perplexity"] != result.best.perplexity  # measured again after healing
    assert json.loads((tmp_path / "s" / "trials.json").read_text())["heal"]["bytes"] == heal["bytes"]


def test_heal_minutes_skips_a_choice_that_prunes_nothing(tiny, tmp_path) -> None:
    cfg = _small(uniform=False, trials=1, depth=(0.0,), width=(0.0,), bits=(4,), int8_layers=(0,), head_bits=("8",),
                 max_perplexity_increase=10.0, heal_minutes=0.05)
    result = search_llm(tiny, "shakespeare", tokenizer=_bytes, progress=False, **cfg)
    assert result.heal == {"skipped": "nothing was pruned"}
    assert len(result.model.model.layers) == len(tiny.model.layers)
