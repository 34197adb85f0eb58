"""Row tiers: an embedding table packed at several widths, its most used rows finest. Parsing and bad input,
tier sizes (property tests), the most used rows in the finest tier, lookups and a tied head's logits equal to the
table each row's width gives, closer to the original than one width at fewer bytes, save -> reload, CLI."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

import bondcut
from bondcut.cli import app
from bondcut.quant import QuantizeConfig, TiedQuantHead, quantize_model
from bondcut.quant.apply import rounded_table
from bondcut.quant.kernels import packed_kernels
from bondcut.quant.modules import TieredQuantEmbedding
from bondcut.quant.tiers import ROW_MULTIPLE, RowTiers, parse_embedding_precision, tiered_values
from bondcut.sizes import directory_weight_bytes


@pytest.mark.parametrize(
    "text, problem",
    [("8:0.1,4:0.8", "sum to 1"), ("5:0.5,4:0.5", "width"), ("8:0,4:1", "share"), ("8-0.1", "look like"), ("", "look")],
)
def test_bad_tiers_name_the_problem_and_show_an_example(text, problem):
    with pytest.raises(ValueError, match=problem) as err:
        RowTiers.parse(text)
    assert "8:0.1" in str(err.value)


def test_precision_text_is_a_width_tiers_or_float():
    assert parse_embedding_precision(None) is None
    assert parse_embedding_precision(4) == 4 and parse_embedding_precision("3") == 3
    assert parse_embedding_precision("8:0.25,4:0.75") == RowTiers(((8, 0.25), (4, 0.75)))
    assert str(RowTiers.parse("8:0.25,4:0.75")) == "8:0.25,4:0.75"


@settings(max_examples=60, deadline=None)
@given(
    rows=st.integers(1, 5000),
    shares=st.lists(st.integers(1, 20), min_size=1, max_size=4),
    widths=st.lists(st.sampled_from([8, 4, 3, 2]), min_size=4, max_size=4),
    seed=st.integers(0, 2**16),
)
def test_tiers_cover_every_row_once_in_kernel_sized_blocks_most_used_first(rows, shares, widths, seed):
    tiers = RowTiers(tuple((b, s / sum(shares)) for b, s in zip(widths, shares)))
    counts = tiers.counts(rows)
    assert sum(counts) == rows and all(n >= 0 for n in counts)
    for i, n in enumerate(counts[:-1]):  # kernel-sized, unless the table ran out of rows (later tiers then empty)
        assert n % ROW_MULTIPLE == 0 or sum(counts[i + 1 :]) == 0, counts
    usage = torch.rand(rows, generator=torch.Generator().manual_seed(seed))
    tier_of = tiers.assign(usage)
    assert [int((tier_of == t).sum()) for t in range(len(counts))] == counts
    for t in range(len(counts) - 1):  # every row of tier t is used at least as much as every row of tier t+1
        here, later = usage[tier_of == t], usage[tier_of > t]
        if len(here) and len(later):
            assert here.min() >= later.max()
    per_row = {b: 576 * b / 8 + 4 * 9 for b in tiers.widths}
    index = rows if len(counts) > 1 else 0
    assert tiers.nbytes(rows, 576, 64) == index + sum(
        int(-(-n * per_row[b] // 1)) for b, n in zip(tiers.widths, counts)
    )


@pytest.fixture(scope="module")
def usage(trained_model):
    """Token counts on the train split (ties by the model's predictions): what quantize ranks rows by."""
    from bondcut.quant.tiers import corpus_usage

    model, tokenizer = trained_model
    return corpus_usage(model, tokenizer, tokens=512)


@pytest.fixture(scope="module")
def tiered(trained_model, usage):
    """The trained model with only its tied table packed 8:0.25,4:0.75 (to nearest), and the same at int4."""
    model, _ = trained_model
    built = {}
    for name, config in {"tiered": QuantizeConfig(bits=4, linear=False, embedding_tiers="8:0.25,4:0.75"),
                         "int4": QuantizeConfig(bits=4, linear=False)}.items():  # fmt: skip
        built[name] = copy.deepcopy(model)
        quantize_model(built[name], config, usage=usage)
    return built


def test_most_used_rows_take_the_finest_tier_and_lookups_read_each_rows_width(trained_model, usage, tiered):
    model, tokenizer = trained_model
    embedding = tiered["tiered"].get_input_embeddings()
    assert isinstance(embedding, TieredQuantEmbedding) and embedding.bits == (8, 4)
    assert isinstance(tiered["tiered"].get_output_embeddings(), TiedQuantHead)
    common = tokenizer(" the of and to a in", add_special_tokens=False).input_ids
    assert all(int(embedding.row_tier[i]) == 0 for i in common)
    table = model.get_input_embeddings().weight.detach()
    tiers = RowTiers.parse("8:0.25,4:0.75")
    expected = tiered_values({b: rounded_table(table, b, 64) for b in (8, 4)}, tiers.assign(usage), tiers)
    ids = torch.cat([torch.arange(0, table.shape[0], 41)[:1194], torch.tensor(common)[:6]]).view(2, -1)
    with torch.no_grad():
        torch.testing.assert_close(embedding(ids), expected[ids], rtol=0, atol=1e-6)
        x = torch.randn(2, 3, table.shape[1])
        exact = torch.nn.functional.linear(x, expected)
        with packed_kernels(False):
            torch.testing.assert_close(tiered["tiered"].get_output_embeddings()(x), exact, rtol=0, atol=1e-4)
        fast = tiered["tiered"].get_output_embeddings()(x)  # tier by tier through the CPU kernels where they fit
        assert float((fast - exact).norm() / exact.norm()) < 1e-2
    x.requires_grad_(True)  # training sees the whole dequantized table
    torch.testing.assert_close(tiered["tiered"].get_output_embeddings()(x), exact, rtol=0, atol=1e-4)


def test_tiers_are_closer_than_one_width_and_cost_what_they_say(trained_model, tiered, prompt_ids, tmp_path):
    model, tokenizer = trained_model
    with torch.no_grad():
        reference = torch.log_softmax(model(prompt_ids).logits, -1)

        def kl(m) -> float:
            return float((reference.exp() * (reference - torch.log_softmax(m(prompt_ids).logits, -1))).sum(-1).mean())

        assert kl(tiered["tiered"]) < kl(tiered["int4"]), (kl(tiered["tiered"]), kl(tiered["int4"]))
        sizes = {}
        for name, m in tiered.items():
            path = bondcut.save(m, tmp_path / name, tokenizer=tokenizer)
            sizes[name] = directory_weight_bytes(path)
        table = model.get_input_embeddings().weight
        rows, width = table.shape
        gained = RowTiers.parse("8:0.25,4:0.75").nbytes(rows, width, 64) - RowTiers.parse("4:1").nbytes(rows, width, 64)
        assert sizes["tiered"] - sizes["int4"] == pytest.approx(gained, abs=4096)  # the header differs a little
        reloaded = bondcut.load(tmp_path / "tiered")[0]
        assert isinstance(reloaded.get_input_embeddings(), TieredQuantEmbedding)
        assert torch.equal(reloaded.get_input_embeddings().row_tier, tiered["tiered"].get_input_embeddings().row_tier)
        assert torch.equal(reloaded(prompt_ids).logits, tiered["tiered"](prompt_ids).logits)


def test_one_tier_packs_a_plain_table_and_tiers_without_usage_or_text_are_refused(trained_model):
    from bondcut.quant import QuantEmbedding

    model, _ = trained_model
    one = copy.deepcopy(model)
    quantize_model(one, QuantizeConfig(bits=8, linear=False, embedding_tiers="4:1"))
    assert isinstance(one.get_input_embeddings(), QuantEmbedding) and one.get_input_embeddings().bits == 4
    with pytest.raises(ValueError, match="tokenizer"):
        quantize_model(copy.deepcopy(model), QuantizeConfig(bits=4, linear=False, embedding_tiers="8:0.5,4:0.5"))
    with pytest.raises(ValueError, match="width"):
        QuantizeConfig(bits=4, embedding_tiers="8:0.5,5:0.5")


def test_cli_quantize_with_embedding_tiers_and_bad_tiers(tmp_path):
    runner = CliRunner()
    out = tmp_path / "tiers"
    result = runner.invoke(app, ["quantize", "smollm2-135m", "--out", str(out), "--bits", "4",
                                 "--embedding-tiers", "8:0.1,4:0.9"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "8:0.1,4:0.9" in result.output
    model, _ = bondcut.load(out)
    embedding = model.get_input_embeddings()
    assert isinstance(embedding, TieredQuantEmbedding) and embedding.bits == (8, 4)
    assert int((embedding.row_tier == 0).sum()) == RowTiers.parse("8:0.1,4:0.9").counts(embedding.num_embeddings)[0]
    bad = runner.invoke(app, ["quantize", "smollm2-135m", "--out", str(tmp_path / "bad"),
                              "--embedding-tiers", "8:0.1,4:0.5"])  # fmt: skip
    assert bad.exit_code != 0 and "sum to 1" in bad.output and not (tmp_path / "bad").exists()
