from embforge.data.stdlib_code import collect_pairs, is_held_out, split_pairs


def test_stdlib_pairs_are_real_and_split_by_module():
    pairs, stats = collect_pairs()
    assert len(pairs) > 1000 and stats.functions > stats.kept
    assert sum(stats.skipped.values()) + len(pairs) == stats.functions + stats.skipped["unparsable file"]
    train, held = split_pairs(pairs, stats)
    train_tops = {p.module.split(".")[0] for p in train}
    held_tops = {p.module.split(".")[0] for p in held}
    assert not train_tops & held_tops and len(held) > 300
    assert all(is_held_out(p.module, 0.25) for p in held)
    sample = held[0]
    assert sample.query not in sample.positive  # the docstring is removed from the code
    assert sample.positive.lstrip().startswith(("def ", "async def ", "@"))
    assert len({p.query for p in train}) == len(train)
