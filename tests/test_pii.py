"""PII masking (`data.mask_pii`, `bigmodel data scan`; Microsoft Presidio, offline): recall on a seeded generated set,
no detections on benign text, no network use, masked values never reach the vocabulary, the artifact or a
checkpoint, and predict / generate / translate mask their inputs as training did."""

from __future__ import annotations

import csv
import json
import re
import socket

import pytest

from conftest import run_cli

pytest.importorskip("presidio_analyzer", reason="the privacy extra (Presidio) is not installed")

TYPES = ["email", "phone", "credit_card", "iban", "ip", "url"]


@pytest.fixture(scope="module")
def masker():
    from bigmodel.privacy.pii import PIIMasker

    return PIIMasker(TYPES)


@pytest.fixture()
def no_network(monkeypatch):
    """Any attempt to open a connection fails the test (and is counted)."""
    tries = []

    def refuse(*args, **kwargs):
        tries.append(args)
        raise OSError("network disabled by the test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    return tries


def test_full_span_recall_on_a_seeded_generated_set_without_network(no_network):
    from bigmodel.privacy import synthetic
    from bigmodel.privacy.pii import PIIMasker

    m = PIIMasker(TYPES)  # built with the network down: no model download, no public-suffix fetch
    items = synthetic.cases(TYPES, 120, seed=0)
    r = synthetic.recall(m, items)
    for t in ("email", "iban", "ip", "credit_card", "url"):
        assert r[t] >= 0.99, (t, r)
    assert r["phone"] >= 0.95, r
    two_series = [c for c in items if c.type == "credit_card" and c.value[0] == "2"]
    assert len(two_series) >= 10 and synthetic.recall(m, two_series)["credit_card"] == 1.0  # Mastercard 2221-2720
    assert no_network == []


def test_no_detections_on_benign_text(masker):
    from bigmodel.data.corpus import shakespeare_files
    from bigmodel.privacy import synthetic

    for text in synthetic.BENIGN:
        assert masker.find(text) == [], text
    play = shakespeare_files()[0].read_text(encoding="latin-1")
    assert len(play) > 100_000 and masker.find(play) == []  # also the chunking of long texts


def test_mask_styles(masker, monkeypatch):
    from bigmodel.errors import UserError
    from bigmodel.privacy.pii import PIIMasker

    text = "mail anna.smith@example.com or call +44 20 7946 0958, from 10.1.2.3"
    out, counts = masker.mask(text)
    assert out == "mail <EMAIL> or call <PHONE>, from <IP>" and counts == {"email": 1, "phone": 1, "ip": 1}
    assert PIIMasker(["email"], "redact").mask("to anna@example.com now")[0] == "to  now"
    monkeypatch.delenv("BIGMODEL_PII_SALT", raising=False)
    with pytest.raises(UserError, match="BIGMODEL_PII_SALT"):
        PIIMasker(["email"], "hash")
    monkeypatch.setenv("BIGMODEL_PII_SALT", "a-secret-of-sixteen+")
    h = PIIMasker(["email"], "hash")
    a, b, c = (h.mask(f"to {e}")[0] for e in ("anna@example.com", "anna@example.com", "li@example.com"))
    assert a == b != c and re.fullmatch(r"to <EMAIL:[0-9a-f]{10}>", a)
    monkeypatch.setenv("BIGMODEL_PII_SALT", "another-secret-sixteen")
    assert PIIMasker(["email"], "hash").mask("to anna@example.com")[0] != a  # keyed: the secret changes the token


def test_person_names_with_a_local_spacy_pipeline(tmp_path):
    """Named-entity types take a spaCy pipeline folder (here a rule-based one written to disk)."""
    import spacy

    from bigmodel.privacy.pii import PIIMasker

    nlp = spacy.blank("en")
    ruler = nlp.add_pipe("entity_ruler")
    ruler.add_patterns([{"label": "PERSON", "pattern": [{"LOWER": "ada"}, {"LOWER": "lovelace"}]}])
    nlp.to_disk(tmp_path / "ner")
    m = PIIMasker(["person", "email"], model=tmp_path / "ner")
    assert m.mask("Ada Lovelace wrote to ada@example.com")[0] == "<PERSON> wrote to <EMAIL>"


def test_recipe_errors_are_one_line(tmp_path):
    csv_path = tmp_path / "t.csv"
    csv_path.write_text("text,label\na,x\nb,y\n")
    base = ["recipe", "validate", "recipes/tweets_fasttext.yaml", f"data.path={csv_path}", "data.source=csv"]
    p = run_cli(*base, "data.mask_pii=[email,passport]")
    assert p.returncode == 2 and "unknown PII type 'passport'" in p.stderr and len(p.stderr.strip().splitlines()) == 1
    p = run_cli(*base, "data.mask_pii=[person]")
    assert p.returncode == 2 and "data.pii_model" in p.stderr and "Traceback" not in p.stderr


# ------------------------------------------------------------------------------------------- the tweet corpus
EMAIL = re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}")
PHONE = re.compile(r"(?<![\w.])(?:\+?1[-. ]?)?\(?\d{3}\)?[-. ]?\d{3}[-. ]?\d{4}(?![\w.])")  # US-style numbers


def _values(text: str) -> list[str]:
    """Email addresses and the US-style numbers `phonenumbers` calls valid (not `1-3001408092`, a booking reference)."""
    import phonenumbers

    return EMAIL.findall(text) + [
        v for v in PHONE.findall(text) if phonenumbers.is_valid_number(phonenumbers.parse(v, "US"))
    ]


def _pieces(value: str, digits: bool) -> set[str]:
    """What of a value a word-level vocabulary would hold: its letter/digit runs (lower-cased) of ≥ 4 characters."""
    return {p.lower() for p in re.findall(r"\d+" if digits else r"\w+", value) if len(p) >= 4}


@pytest.fixture(scope="module")
def tweets_with_pii(tmp_path_factory):
    """Every tweet holding an email address or a valid US-style phone number (found by plain regular expressions and
    `phonenumbers`, not by the masker under test) plus 400 others, as a CSV; the values; the pieces a vocabulary could
    learn of them."""
    from bigmodel.data.text import tweets_path

    with tweets_path().open(newline="", encoding="latin-1") as f:
        rows = list(csv.DictReader(f))
    values, pii_rows, other = [], [], []
    for r in rows:
        found = _values(r["text"])
        (pii_rows if found else other).append(r)
        values += found
    keep = pii_rows + other[:400]
    path = tmp_path_factory.mktemp("tweets") / "tweets.csv"
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        w.writerows([r["text"], r["sentiment"]] for r in keep)
    # pieces that only ever occur inside these values (so their absence from a vocabulary means something)
    rest = " ".join(re.sub("|".join(map(re.escape, _values(r["text"]))) or "^$", " ", r["text"]) for r in keep)
    rest = rest.lower()
    words = set(re.findall(r"\w+", rest))
    pieces = set()
    for v in values:
        pieces |= _pieces(v, digits=not EMAIL.fullmatch(v)) - words
    return path, sorted(set(values)), sorted(pieces)


def test_masked_tweets_reach_no_vocabulary_artifact_or_checkpoint(tweets_with_pii, tmp_path):
    from bigmodel.api import load_artifact
    from bigmodel.config import TokenizerConfig
    from bigmodel.data.text import encode, train_tokenizer

    path, values, pieces = tweets_with_pii
    assert len([v for v in values if "@" in v]) >= 15 and len([v for v in values if "@" not in v]) >= 20
    texts = [row["text"] for row in csv.DictReader(path.open(encoding="utf-8"))]
    tok_cfg = TokenizerConfig(kind="word", min_frequency=1, vocab_size=100_000)
    unmasked_vocab = set(train_tokenizer(tok_cfg, texts).get_vocab())
    assert len(set(pieces) & unmasked_vocab) >= 0.9 * len(pieces)  # without masking the vocabulary holds them

    out = tmp_path / "run"
    run_cli(
        "train", "recipes/tweets_fasttext.yaml", "data.source=csv", f"data.path={path}", "data.text_column=text",
        "data.label_column=label", "data.mask_pii=[email,phone]", "data.tokenizer.kind=word",
        "data.tokenizer.min_frequency=1", "train.epochs=2", "train.checkpoint_every=5", "train.keep_checkpoints=10",
        "--out", str(out), "--no-progress", check=True,
    )  # fmt: skip
    vocab = json.loads((out / "model" / "tokenizer.json").read_text())["model"]["vocab"]
    assert not set(pieces) & set(vocab), sorted(set(pieces) & set(vocab))[:10]
    assert "email" in vocab and "phone" in vocab  # the tags: <EMAIL> → <, email, >
    files = [p for p in out.rglob("*") if p.is_file()]
    assert any("checkpoints" in p.parts for p in files)
    blobs = [p.read_bytes() for p in files]
    for v in values:
        local = v.split("@")[0].lower() if "@" in v else ""  # (its words are checked as tokens above: as bytes,
        needles = {v.encode(), v.lower().encode()} | ({local.encode()} if len(local) >= 6 else set())  # @derekc21)
        for p, blob in zip(files, blobs, strict=True):
            assert not any(n in blob for n in needles), (v, p)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["pii_masked"]["email"] >= 15 and summary["pii_masked"]["phone"] >= 20
    # predict masks its input as training did: an address becomes the tag's tokens
    art = load_artifact(out)
    x, _ = art.encode_texts(["mail me at someone.new@example.org please"])
    y, _ = encode(art.preprocess.tokenizer, ["mail me at <EMAIL> please"])
    assert x.tolist() == y.tolist()
    pred = run_cli("predict", str(out), "call 617-555-0123 now", "--json", check=True)
    r = json.loads(pred.stdout)["predictions"][0]
    assert r["masked_text"] == "call <PHONE> now" and r["label"] in ("negative", "neutral", "positive")


def test_data_scan_reports_counts_and_masked_examples(tweets_with_pii):
    path, values, _ = tweets_with_pii
    p = run_cli("data", "scan", str(path), "--types", "email,phone", "--json", "--examples", "3", check=True)
    r = json.loads(p.stdout)
    assert r["counts"]["email"] >= 15 and r["counts"]["phone"] >= 20 and len(r["examples"]) == 3
    assert not any(v in p.stdout for v in values)  # examples are shown masked
    p = run_cli("data", "scan", str(path), "--column", "nope")
    assert p.returncode == 2 and "no column 'nope'" in p.stderr


def test_language_model_and_translation_data_are_masked(tmp_path):
    from bigmodel.config import LanguageModelDataConfig, TranslationDataConfig
    from bigmodel.data.corpus import load_corpus
    from bigmodel.data.parallel import load_pairs

    lm_file = tmp_path / "c.txt"
    lm_file.write_text("write to ada@example.com today\n" * 50 + "or call +1 212 555 0147\n" * 50)
    cfg = LanguageModelDataConfig(source="text", path=lm_file, mask_pii=["email", "phone"])
    corpus = load_corpus(cfg, 0)
    assert "@" not in corpus.train + (corpus.val or "") + (corpus.test or "") and "<EMAIL>" in corpus.train
    assert corpus.pii_masked == {"email": 50, "phone": 50}
    pairs = tmp_path / "p.tsv"
    pairs.write_text("mail ada@example.com\tescribe a ada@example.com\n" * 20)
    tcfg = TranslationDataConfig(source="tsv", path=pairs, mask_pii=["email"])
    data = load_pairs(tcfg, 0)
    assert set(data.train.source) == {"mail <EMAIL>"} and set(data.train.target) == {"escribe a <EMAIL>"}


# ------------------------------------------------------------------------------------------------- the canary
SECRET, PREFIX = "617-555-0147", "my phone is "


@pytest.fixture(scope="module")
def canary_corpus(tmp_path_factory):
    """A page of Shakespeare with the canary line planted 40 times."""
    from bigmodel.data.corpus import shakespeare_files

    lines = shakespeare_files()[0].read_text(encoding="latin-1").splitlines()[200:600]
    for i in range(40):
        lines.insert(10 * i, PREFIX + SECRET)
    path = tmp_path_factory.mktemp("canary") / "corpus.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.mark.slow
@pytest.mark.parametrize("masked", [False, True], ids=["plain", "masked"])
def test_canary_is_reproduced_without_masking_and_never_with(canary_corpus, tmp_path, masked):
    out = tmp_path / "lm"
    run_cli(
        "train", "recipes/shakespeare_char_gpt.yaml", "data.source=text", f"data.path={canary_corpus}",
        "data.val_fraction=0.02", "data.test_fraction=0.02", "model.dim=64", "model.num_layers=2",
        "data.batches_per_epoch=200", "train.epochs=4", "data.context_length=32", "train.batch_size=16",
        *(["data.mask_pii=[phone]"] if masked else []), "--out", str(out), "--no-progress", check=True,
    )  # fmt: skip
    p = run_cli("audit", str(out), "--canary", SECRET, "--prefix", PREFIX, "--candidates", "300", "--json", check=True)
    r = json.loads(p.stdout)
    if masked:
        assert not r["reproduced"] and r["greedy"].startswith("<PHONE>"), r["greedy"]
        assert r["exposure"] < 4  # of log2(301) = 8.23: the number is no likelier than most random ones
    else:
        assert r["reproduced"] and r["rank"] == 1 and r["exposure"] == r["max_exposure"], r


def test_masking_a_stream_of_parts_masks_the_pieces_of_the_whole(masker, monkeypatch):
    """`mask_stream` (how `data prepare` masks a corpus split it never holds) sends the analyzer the pieces `_pieces`
    cuts the whole text into, however the text arrives, and returns the whole text masked."""
    import random
    from collections import Counter

    from bigmodel.privacy import pii

    monkeypatch.setattr(pii, "_CHUNK", 60)
    rng = random.Random(4)
    lines = []
    for i in range(40):
        words = [rng.choice(["see", "mail", "x" * rng.randrange(1, 70), "to"]) for _ in range(rng.randrange(0, 6))]
        lines.append(" ".join(words + ([f"bob{i}@example.org"] if i % 3 == 0 else [])))
    text = "\n".join(lines)
    whole = [p for _, p in pii._pieces(text)]
    assert len(whole) > 10 and any("\n" not in p and len(p) == 60 for p in whole)  # cut at a break, and without one
    want: Counter[str] = Counter()
    masked = "".join(masker._mask_piece(p, want) for p in whole)
    seen: list[str] = []
    cut = masker._mask_piece
    monkeypatch.setattr(masker, "_mask_piece", lambda p, c: seen.append(p) or cut(p, c))
    for sizes in ([len(text)], [1] * len(text), [rng.randrange(1, 150) for _ in range(len(text))]):
        parts, i = [], 0
        for n in sizes:
            parts.append(text[i : i + n])
            i += n
        seen.clear()
        counts: Counter[str] = Counter()
        assert "".join(masker.mask_stream(iter(parts), counts)) == masked and seen == whole
        assert counts == want and want["email"] >= 12
    assert masker.mask(text) == (masked, want)
