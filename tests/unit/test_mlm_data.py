"""MLM data: packing into fixed-length chunks and seeded 80/10/10 masking."""

import pytest
import torch

from embforge.data.mlm import IGNORE, mask_tokens, pack_chunks, read_documents, split_heldout
from embforge.errors import DataError

CLS, SEP, PAD, MASK, UNK = 101, 102, 0, 103, 100
SPECIALS = [PAD, UNK, CLS, SEP, MASK]


def masked(ids, seed=0, prob=0.3):
    return mask_tokens(
        ids,
        mask_prob=prob,
        mask_token_id=MASK,
        special_ids=SPECIALS,
        vocab_size=30522,
        generator=torch.Generator().manual_seed(seed),
    )


def corpus(rows=400, length=128):
    ids = torch.randint(1000, 30522, (rows, length), generator=torch.Generator().manual_seed(5))
    ids[:, 0], ids[:, -1], ids[:, 60] = CLS, SEP, UNK
    return ids


def test_masking_rates_and_specials_never_masked():
    ids = corpus()
    inputs, labels = masked(ids)
    chosen = labels != IGNORE
    special = torch.isin(ids, torch.tensor(SPECIALS))
    assert not (chosen & special).any() and torch.equal(inputs[special], ids[special])
    assert abs(chosen.sum() / (~special).sum() - 0.30) < 0.01
    assert torch.equal(labels[chosen], ids[chosen]) and torch.equal(inputs[~chosen], ids[~chosen])
    n = chosen.sum().item()
    to_mask = (inputs == MASK) & chosen
    unchanged = (inputs == ids) & chosen
    randomised = chosen & ~to_mask & ~unchanged
    assert abs(to_mask.sum() / n - 0.8) < 0.015
    assert abs(unchanged.sum() / n - 0.1) < 0.015  # (a random draw equal to the original is ~3e-5 likely)
    assert abs(randomised.sum() / n - 0.1) < 0.015
    assert not torch.isin(inputs[randomised], torch.tensor(SPECIALS)).any()


def test_masking_is_seeded():
    ids = corpus(rows=8)
    a, b, c = masked(ids, seed=1), masked(ids, seed=1), masked(ids, seed=2)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1])
    with pytest.raises(DataError, match="mask_prob"):
        masked(ids, prob=0.0)


def test_pack_chunks_fixed_length_in_order():
    docs = [[1000 + i for i in range(7)], [2000 + i for i in range(5)], [3000, 3001]]
    chunks, dropped = pack_chunks(docs, chunk_len=6, cls_id=CLS, sep_id=SEP)
    stream = [*docs[0], SEP, *docs[1], SEP, *docs[2], SEP]  # 17 tokens, 4 per chunk body
    assert chunks.shape == (4, 6) and dropped == 1
    assert (chunks[:, 0] == CLS).all() and (chunks[:, -1] == SEP).all()
    assert chunks[:, 1:-1].flatten().tolist() == stream[:16]


def test_wikitext_articles_and_heldout_split(tmp_path):
    path = tmp_path / "wiki.tokens"
    path.write_text(
        " \n = First = \n \n Some text @-@ here with <unk> and 1 @,@ 000 . \n \n = = Section = = \n More text . \n"
        " = Second = \n \n Other words . \n = Third = \n Last one . \n"
    )
    docs = read_documents(path, "wikitext")
    assert len(docs) == 3
    assert docs[0].startswith("= First =") and "text-here with [UNK] and 1,000" in docs[0] and "= = Section" in docs[0]
    train, held = split_heldout(docs, 0.34)
    assert held == docs[2:] and train == docs[:2]
    with pytest.raises(DataError, match="cannot hold back"):
        split_heldout(docs[:1], 0.5)


@pytest.mark.shared_data
def test_shared_wikitext2_reads(shared_data):
    docs = read_documents(shared_data / "wikitext2" / "wiki.valid.tokens", "wikitext")
    assert 50 <= len(docs) <= 70 and all(d.startswith("= ") for d in docs)
