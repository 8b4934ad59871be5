"""The Nomic CPU twin's data: weak pairs from the shared datasets (the run itself: docs/results.md)."""

import json

import pytest

from embforge.apps.nomic_cpu import RECIPES, data_root, raw_pairs
from embforge.data.mlm import read_wikitext_sections
from embforge.errors import DataError
from embforge.train.recipe import recipe_path

WIKI = "\n".join(  # WikiText's own layout: space-padded lines, headings " = Title = "
    [
        " ",
        " = Homarus gammarus = ",
        " ",
        " Homarus gammarus , known as the European lobster , is a species of <unk> lobster . ",
        " It is closely related to the American lobster . ",
        " ",
        " = = Description = = ",
        " ",
        " Homarus gammarus is a large crustacean , 0 @.@ 7 kg . ",
        " ",
        " = = = Claws = = = ",
        " ",
        " The first pair is armed with claws . ",
        " = Second article = ",
        " Text of the second article . ",
        "",
    ]
)


def _jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_wikitext_sections_are_title_body_pairs(tmp_path):
    path = tmp_path / "wiki.tokens"
    path.write_text(WIKI)
    assert read_wikitext_sections(path) == [
        ("Homarus gammarus", "Homarus gammarus , known as the European lobster , is a species of [UNK] lobster ."),
        ("Homarus gammarus: Description", "Homarus gammarus is a large crustacean , 0.7 kg ."),
        ("Homarus gammarus: Claws", "The first pair is armed with claws ."),
        ("Second article", "Text of the second article ."),
    ]


def test_raw_pairs_keep_only_the_related_ones(tmp_path):
    for name in ("wiki.valid.tokens", "wiki.test.tokens"):
        (tmp_path / "wikitext2").mkdir(exist_ok=True)
        (tmp_path / "wikitext2" / name).write_text(WIKI)
    _jsonl(
        tmp_path / "snli" / "pairs_dev.jsonl",
        [
            {"premise": "A man sleeps .", "hypothesis": "A person rests .", "label": "entailment"},
            {"premise": "A man sleeps .", "hypothesis": "A man runs .", "label": "contradiction"},
        ],
    )
    _jsonl(
        tmp_path / "mrpc" / "train.jsonl",
        [{"sentence1": "a", "sentence2": "b", "label": 1}, {"sentence1": "c", "sentence2": "d", "label": 0}],
    )
    _jsonl(
        tmp_path / "stsbenchmark" / "train.jsonl",
        [{"sentence1": "e", "sentence2": "f", "score": 4.2}, {"sentence1": "g", "sentence2": "h", "score": 3.9}],
    )
    pairs = raw_pairs(tmp_path)
    assert len(pairs["wikitext_title_body"]) == 8  # 4 sections x 2 files
    assert pairs["snli_entailment"] == [{"query": "A man sleeps .", "positive": "A person rests ."}]
    assert pairs["mrpc_paraphrase"] == [{"query": "a", "positive": "b"}]
    assert pairs["stsb_similar"] == [{"query": "e", "positive": "f"}]


def test_twin_recipes_name_the_filtered_sources():
    from embforge.train.recipe import load_recipe

    recipe, _ = load_recipe(recipe_path(RECIPES[1]))
    assert {d.name for d in recipe.stages[0].data.datasets} == {"wikitext_title_body", "snli_entailment",
                                                               "mrpc_paraphrase", "stsb_similar"}  # fmt: skip
    assert all(d.path == f"filtered/{d.name}.jsonl" for d in recipe.stages[0].data.datasets)
    finetune, _ = load_recipe(recipe_path(RECIPES[2]))
    assert finetune.model.matryoshka_rule == "layer_norm" and finetune.stages[0].data.num_negatives == 7


def test_data_root_is_the_flag_then_embforge_data_then_the_default(tmp_path, monkeypatch):
    flag, env = tmp_path / "flag", tmp_path / "env"
    for root in (flag, env):
        (root / "wikitext2").mkdir(parents=True)
    monkeypatch.setenv("EMBFORGE_DATA", str(env))
    assert data_root(str(flag)) == flag
    assert data_root(None) == env
    monkeypatch.delenv("EMBFORGE_DATA")
    (tmp_path / "checkout").mkdir()
    (tmp_path / "shared" / "data" / "wikitext2").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "checkout")  # the default, ../shared/data, is relative to the working directory
    assert data_root(None).resolve() == (tmp_path / "shared" / "data").resolve()


def test_a_missing_or_wrong_data_root_says_where_it_came_from(tmp_path, monkeypatch):
    monkeypatch.setenv("EMBFORGE_DATA", str(tmp_path / "nowhere"))
    with pytest.raises(DataError, match=r"nowhere \(\$EMBFORGE_DATA\): no such folder; pass --data-root DIR"):
        data_root(None)
    with pytest.raises(DataError, match=r"\(--data-root\): not the shared datasets folder \(no wikitext2/\)"):
        data_root(str(tmp_path))
