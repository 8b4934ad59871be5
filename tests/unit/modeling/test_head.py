"""The head spec is the one description of an embedding head: every way in and out of a model carries it whole."""

from __future__ import annotations

import copy
import dataclasses
import json
import pickle
import subprocess
import sys
import typing

import pytest

from embforge.errors import ConfigError
from embforge.modeling.head import MATRYOSHKA_RULES, POOLINGS, HeadSpec
from embforge.models.embedder import Embedder
from embforge.models.tiny import tiny_bert, tiny_nv_embedder

NV_TEMPLATE = "Instruct: {instruction}\nQuery: "


def test_the_spec_round_trips_through_json_and_refuses_what_it_does_not_know():
    head = HeadSpec(pooling="cls", max_seq_len=16, prompts={"query": "q: "}, default_prompt_name="query")
    assert head.pooling == {"name": "cls"}
    assert HeadSpec.from_dict(json.loads(json.dumps(head.to_dict()))) == head
    with pytest.raises(ValueError, match=r"embforge.json: unknown head settings \['pool'\]"):
        HeadSpec.from_dict({"pool": "mean"}, "embforge.json")
    with pytest.raises(dataclasses.FrozenInstanceError):
        head.normalize = False  # type: ignore[misc]
    with pytest.raises(TypeError, match="frozen"):
        head.prompts["query"] = "changed"  # frozen all through: its dicts too
    head.to_dict()["prompts"]["query"] = "changed"  # to_dict gives plain copies
    assert head.prompts == {"query": "q: "}
    assert copy.deepcopy(head) == head == pickle.loads(pickle.dumps(head))


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"pooling": "max"}, "pooling must be one of"),
        ({"attention": "sideways"}, "attention must be one of"),
        ({"matryoshka_rule": "layernorm"}, "matryoshka_rule must be one of"),
        ({"padding_side": "top"}, "padding_side must be one of"),
        ({"max_seq_len": 0}, "max_seq_len must be a positive"),
        ({"default_prompt_name": "query"}, "default_prompt_name 'query' is not among the prompts"),
    ],
)
def test_each_bad_setting_is_named(bad, message):
    with pytest.raises(ValueError, match=message):
        HeadSpec(**bad)


def test_the_recipe_schema_uses_the_heads_name_lists():
    from embforge.models.spec import ModelConfig, PoolingConfig

    hints = typing.get_type_hints(ModelConfig)
    assert typing.get_args(typing.get_type_hints(PoolingConfig)["name"]) == POOLINGS
    assert typing.get_args(hints["matryoshka_rule"])[0] is typing.get_type_hints(HeadSpec)["matryoshka_rule"]
    assert typing.get_args(typing.get_args(hints["matryoshka_rule"])[0]) == MATRYOSHKA_RULES
    # every head setting a recipe may give is a field of the spec, under the same name
    head_like = {f.name for f in dataclasses.fields(ModelConfig)} & set(HeadSpec.field_names())
    assert head_like >= {"pooling", "normalize", "max_seq_len", "prompts", "attention", "matryoshka_rule"}


def test_prompts_resolve_with_a_did_you_mean():
    head = HeadSpec(prompts={"query": "q: ", "document": "d: "})
    assert (head.prompt(), head.prompt("query")) == ("", "q: ")
    with pytest.raises(LookupError, match=r"unknown prompt_name 'qeury'; this model has \['document', 'query'\]"):
        head.prompt("qeury")
    from embforge.errors import InputError
    from embforge.models.prompts import resolve_prompt

    with pytest.raises(InputError, match=r"unknown prompt_name 'qeury' \(did you mean 'query'\?\)"):
        resolve_prompt(head, "qeury")
    assert HeadSpec(instruction_template=NV_TEMPLATE).instruction_prompt("Sort") == "Instruct: Sort\nQuery: "
    assert head.instruction_prompt("Sort") is None


def test_importing_it_needs_neither_torch_nor_embforge_beyond_the_file():
    code = "import sys, embforge.modeling.head, embforge.modeling.tokenization; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_an_embedder_holds_its_resolved_spec_and_refuses_one_its_pooler_cannot_compute():
    backbone, tokenizer = tiny_bert()
    model = Embedder(backbone, tokenizer, HeadSpec(prompts={"query": "q: "}))
    assert (model.head.max_seq_len, model.head.add_eos, model.head.padding_side) == (128, False, "right")
    model.head = model.head.replace(instruction_template=NV_TEMPLATE, pool_prompt=False)
    assert not model.tokenizer_settings().pool_prompt  # tokenisation follows the spec
    with pytest.raises(ConfigError, match="is not this model's pooler"):
        model.head = model.head.replace(pooling="cls")
    with pytest.raises(ConfigError, match="causal applies to decoder LLMs"):
        model.head = model.head.replace(attention="causal")


@pytest.mark.parametrize("kind", ["sentence-transformers", "embforge"])
def test_every_way_out_of_a_model_carries_the_same_spec(kind, tmp_path):
    from embforge.onnx.export import export_onnx

    if kind == "embforge":
        model = tiny_nv_embedder(seed=2, instruction_template=NV_TEMPLATE, prompts={"query": "Query: "})
    else:
        backbone, tokenizer = tiny_bert()
        head = HeadSpec(max_seq_len=48, prompts={"query": "q: ", "document": "d: "}, matryoshka_rule="layer_norm")
        model = Embedder(backbone, tokenizer, head)
    folder = model.save(tmp_path / "model")
    assert (folder / "modules.json").read_text().count("EmbforgeSTModule") == (kind == "embforge")
    assert Embedder.load(folder, device="cpu").head == model.head
    if kind == "embforge":
        saved = json.loads((folder / "embforge.json").read_text())
        assert HeadSpec.from_dict({k: v for k, v in saved.items() if k not in ("format", "versions")}) == model.head
        config = json.loads((folder / "config.json").read_text())
        assert HeadSpec.from_dict(config["head"]) == model.head
        return
    pytest.importorskip("onnxruntime")
    from embforge.onnx.runtime import OnnxEmbedder

    exported = OnnxEmbedder(export_onnx(model, tmp_path / "onnx"))
    assert exported.head == model.head


@pytest.mark.parametrize("name", POOLINGS)
def test_every_pooling_the_spec_names_builds_and_only_the_parameter_free_ones_are_sentence_transformers(name):
    from embforge.modeling.head import PARAMETER_FREE_POOLINGS
    from embforge.modeling.pooling import Pooling, build_pooler

    pooler = build_pooler({"name": name}, 32)
    assert pooler.config()["name"] == name
    assert isinstance(pooler, Pooling) == (name in PARAMETER_FREE_POOLINGS)
    assert HeadSpec(pooling=pooler.config()).fits_sentence_transformers() == (name in PARAMETER_FREE_POOLINGS)


def test_the_tables_keyed_by_pooling_name_cover_the_parameter_free_poolings():
    from embforge.modeling.head import PARAMETER_FREE_POOLINGS
    from embforge.modeling.pooling import _PARAMETER_FREE
    from embforge.models.model_card import _POOL
    from embforge.models.st_format import _POOLING_KEYS

    for table in (_PARAMETER_FREE, _POOL, _POOLING_KEYS):
        assert set(table) == set(PARAMETER_FREE_POOLINGS)
