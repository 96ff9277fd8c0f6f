"""Text data (CSV/TSV/JSONL, aclImdb layout, the bundled tweets), tokenizers, and text models end to end."""

from __future__ import annotations

import json
import subprocess
import sys
import unicodedata

import pytest
import torch

from bigmodel import api
from bigmodel.config import TokenizerConfig, validate_recipe
from bigmodel.data.text import CLS_ID, PAD_ID, UNK_ID, encode, load_text, train_tokenizer
from bigmodel.errors import UserError
from bigmodel.runs import load_artifact
from conftest import run_cli, write_aclimdb_fixture

CORPUS = [
    "The movie was wonderful, truly wonderful!",
    "A dull, boring film. I fell asleep.",
    "Ｆｕｌｌ－ｗｉｄｔｈ letters and the ﬁne ligature",
    "Café naïve résumé — accents stay",
    "Great acting, great story, great fun",
    "Terrible plot and awful dialogue",
] * 20

POS = ["great fun and a wonderful story", "truly wonderful acting", "a great film with great heart", "loved it"]
NEG = ["boring and awful", "a dull terrible plot", "awful dialogue, dull film", "hated it"]


FILLER = ["overall", "I think", "says my friend", "in short", "on Sunday", "at the cinema", "so yes", "honestly"]


def write_reviews(path, n=60, sep=",", bad_row=None):
    lines = [f"text{sep}label"]
    for i in range(n):
        pos = i % 2 == 0
        text = (POS if pos else NEG)[(i // 2) % 4] + " " + FILLER[(i // 2) % len(FILLER)]  # filler: label-neutral
        lines.append(
            f'"{text}"{sep}{"pos" if pos else "neg"}' if sep == "," else f"{text}{sep}{'pos' if pos else 'neg'}"
        )
    if bad_row is not None:
        lines.insert(bad_row, bad_row_text(sep))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def bad_row_text(sep):
    return f'""{sep}pos'


def text_recipe(**data):
    return {
        "task": "text_classification",
        "data": {"val_fraction": 0.2, "test_fraction": 0.2, **data},
        "model": {"name": "transformer-classifier", "dim": 16, "num_heads": 2, "num_layers": 1},
        "train": {"epochs": 2, "batch_size": 8, "log_every": 5},
    }


# --------------------------------------------------------------------------------------------------- tokenizers
@pytest.mark.parametrize("kind", ["bpe", "wordpiece", "word", "char"])
def test_tokenizer_round_trip_and_specials(kind):
    cfg = TokenizerConfig(kind=kind, vocab_size=300, min_frequency=1, max_length=64)
    tok = train_tokenizer(cfg, CORPUS)
    # WordPiece always keeps every character and its `##` form (the limit is raised to fit them); others obey it.
    chars = {c for t in CORPUS for c in tok.normalizer.normalize_str(t) if not c.isspace()}
    limit = 300 if kind != "wordpiece" else max(300, 5 + 2 * len(chars) + 1)
    assert tok.get_vocab_size() <= limit and tok.token_to_id("[PAD]") == PAD_ID
    assert tok.token_to_id("[UNK]") == UNK_ID and tok.token_to_id("[CLS]") == CLS_ID
    for text in CORPUS[:6]:
        enc = tok.encode(text)
        assert enc.ids[0] == CLS_ID
        norm = unicodedata.normalize("NFKC", text).lower()
        decoded = tok.decode(enc.ids)
        if kind in ("bpe", "char"):
            assert decoded.strip() == norm  # lossless on text seen in training
        else:  # word-level and WordPiece decode to space-separated tokens: re-encoding gives the same ids
            assert tok.encode(decoded).ids == enc.ids
    # NFKC and lower-casing happen inside the tokenizer (so the artifact reproduces them)
    assert tok.normalizer.normalize_str("Ｆｕｌｌ ﬁne") == "full fine"


def test_tokenizer_unknown_words_truncation_and_padding():
    tok = train_tokenizer(TokenizerConfig(kind="word", vocab_size=100, min_frequency=1, max_length=5), CORPUS)
    ids, lengths = encode(tok, ["wonderful zyzzyva", "the movie was wonderful truly wonderful great fun"])
    assert ids.shape == (2, 5) and lengths.tolist() == [3, 5]
    assert ids[0, 2] == UNK_ID and ids[0, 3:].tolist() == [PAD_ID, PAD_ID]
    no_cls = train_tokenizer(TokenizerConfig(kind="word", min_frequency=1, add_cls=False, lowercase=False), CORPUS)
    assert no_cls.encode("The movie").tokens == ["The", "movie"]


def test_vocab_size_limit_and_min_frequency():
    small = train_tokenizer(TokenizerConfig(kind="word", vocab_size=12, min_frequency=1), CORPUS)
    assert small.get_vocab_size() == 12
    rare = train_tokenizer(TokenizerConfig(kind="word", min_frequency=1000), CORPUS)
    assert rare.get_vocab_size() == 5  # only the special tokens survive


@pytest.mark.parametrize("kind", ["wordpiece", "bpe", "word"])
def test_tokenizer_training_is_deterministic_across_processes(kind):
    """Hugging Face's WordPiece trainer numbers `##` pieces in hash-map order; ours is fixed up to be stable."""
    code = (
        "import sys; sys.path.insert(0, 'tests');"
        "from test_text import CORPUS; from bigmodel.config import TokenizerConfig;"
        "from bigmodel.data.text import train_tokenizer;"
        f"t = train_tokenizer(TokenizerConfig(kind='{kind}', vocab_size=150, min_frequency=1), CORPUS * 3);"
        "print(sorted(t.get_vocab().items(), key=lambda kv: kv[1]))"
    )
    outs = {
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout for _ in "abc"
    }
    assert len(outs) == 1


# ------------------------------------------------------------------------------------------------------- readers
def test_csv_tsv_jsonl_sources(tmp_path):
    write_reviews(tmp_path / "r.csv")
    write_reviews(tmp_path / "r.tsv", sep="\t")
    (tmp_path / "r.jsonl").write_text(
        "\n".join(
            json.dumps({"review": t, "y": lbl}) for t, lbl in [(p, "pos") for p in POS] + [(n, "neg") for n in NEG]
        )
    )
    for src, path, extra in (
        ("csv", "r.csv", {}),
        ("tsv", "r.tsv", {}),
        ("jsonl", "r.jsonl", {"text_column": "review", "label_column": "y"}),
    ):
        r = validate_recipe(text_recipe(source=src, path=str(tmp_path / path), **extra))
        d = load_text(r.data, 0)
        assert d.labels == ["neg", "pos"]
        n = len(d.train) + len(d.val) + len(d.test)
        assert n == (60 if src != "jsonl" else 8)
        assert sorted(set(d.test.y.tolist())) == [0, 1]  # stratified carving keeps both labels


def test_text_errors_name_file_and_row(tmp_path):
    write_reviews(tmp_path / "r.csv")
    r = validate_recipe(text_recipe(source="csv", path=str(tmp_path / "r.csv"), text_column="review"))
    with pytest.raises(UserError, match=r"r.csv: no column 'review' \(columns: text, label\); set data.text_column"):
        load_text(r.data, 0)
    write_reviews(tmp_path / "empty.csv", bad_row=4)
    r = validate_recipe(text_recipe(source="csv", path=str(tmp_path / "empty.csv")))
    with pytest.raises(UserError, match=r"empty.csv: line 5: empty text in column 'text'"):
        load_text(r.data, 0)
    write_reviews(tmp_path / "test.csv", n=4)
    with open(tmp_path / "test.csv", "a", encoding="utf-8") as f:
        f.write('"what is this",meh\n')
    r = validate_recipe(
        text_recipe(source="csv", train_path=str(tmp_path / "r.csv"), test_path=str(tmp_path / "test.csv"))
    )
    with pytest.raises(UserError, match=r"test.csv: line 6: label 'meh' does not occur in the training data"):
        load_text(r.data, 0)
    (tmp_path / "b.jsonl").write_text('{"text": "ok", "label": "a"}\n{"text": "ok"\n')
    r = validate_recipe(text_recipe(source="jsonl", path=str(tmp_path / "b.jsonl")))
    with pytest.raises(UserError, match=r"b.jsonl: line 2: not valid JSON"):
        load_text(r.data, 0)


def test_malformed_csv_through_the_cli_is_one_line(tmp_path):
    write_reviews(tmp_path / "empty.csv", bad_row=4)
    (tmp_path / "r.yaml").write_text(json.dumps(text_recipe(source="csv", path=str(tmp_path / "empty.csv"))))
    res = run_cli("train", str(tmp_path / "r.yaml"), "--out", str(tmp_path / "run"))
    assert res.returncode == 2
    assert res.stderr.strip().count("\n") == 0 and "empty.csv: line 5: empty text" in res.stderr


def test_aclimdb_layout(tmp_path):
    root = write_aclimdb_fixture(tmp_path / "aclImdb")
    r = validate_recipe(text_recipe(source="aclimdb", path=str(root)))
    d = load_text(r.data, 0)
    assert d.labels == ["neg", "pos"] and len(d.test) == 8 and len(d.train) + len(d.val) == 12
    assert all("<br" not in t for t in d.train.texts)


def test_bundled_tweets():
    r = validate_recipe(text_recipe(source="tweets", val_fraction=0.0, test_fraction=0.2))
    d = load_text(r.data, 0)
    assert d.labels == ["negative", "neutral", "positive"]
    assert len(d.train) + len(d.test) == 38_158
    counts = torch.bincount(torch.cat([d.train.y, d.test.y])).tolist()
    assert counts == [16_186, 15_018, 6_954]


# ------------------------------------------------------------------------------------------------ end to end
@pytest.mark.parametrize(
    "model",
    [
        {"name": "transformer-classifier", "dim": 16, "num_heads": 2, "num_layers": 1, "pooling": "cls"},
        {"name": "lstm-classifier", "hidden_size": 16, "num_layers": 1, "embedding_dim": 16, "bidirectional": True},
        {"name": "embedding-bag", "embedding_dim": 16, "ngram_buckets": 1000},
    ],
    ids=["transformer", "lstm", "embedding-bag"],
)
def test_text_model_trains_reloads_and_predicts(tmp_path, model):
    write_reviews(tmp_path / "r.csv", n=120)
    recipe = text_recipe(
        source="csv", path=str(tmp_path / "r.csv"), tokenizer={"kind": "wordpiece", "min_frequency": 1}
    )
    recipe["model"] = model
    recipe["train"].update(epochs=8, optimizer={"name": "adamw", "lr": 0.01})
    res = api.train(validate_recipe(recipe), out=tmp_path / "run", progress=False)
    assert res.metrics["accuracy"] >= 0.9, res.metrics  # the words give the label away
    art = load_artifact(tmp_path / "run")
    assert (tmp_path / "run" / "model" / "tokenizer.json").is_file()
    texts = ["great fun and a wonderful story", "awful dialogue, dull film", "Ｇｒｅａｔ ＦＵＮ"]
    p1 = art.predict_texts_proba(texts)
    p2 = load_artifact(tmp_path / "run" / "model").predict_texts_proba(texts)
    assert torch.equal(p1, p2)  # a reloaded artifact predicts identically
    out = api.predict(tmp_path / "run", texts=texts, top_k=2)
    assert [o["label"] for o in out[:2]] == ["pos", "neg"] and len(out[0]["top_k"]) == 2
    ev = api.evaluate(tmp_path / "run")
    assert ev["accuracy"] == res.metrics["accuracy"]


def test_embedding_bag_hashes_every_n_gram_inside_the_text():
    from bigmodel.models.sequence import EmbeddingBagClassifier, EmbeddingBagConfig

    vocab, buckets = 50, 1000
    x = torch.tensor([[5, 6, 7, 8, 0, 0], [9, 10, 0, 0, 0, 0]])
    lengths = torch.tensor([4, 2])
    spec = {"vocab_size": vocab, "pad_id": 0}
    m2 = EmbeddingBagClassifier(EmbeddingBagConfig(ngram_buckets=buckets), spec, 3)
    ids = m2.bag_ids(x, lengths)
    # bigrams hash as they always have (artifacts trained before n-grams > 2 existed keep their meaning)
    assert ids[0, 6:9].tolist() == [vocab + (a * 1_000_003 + b) % buckets for a, b in [(5, 6), (6, 7), (7, 8)]]
    m4 = EmbeddingBagClassifier(EmbeddingBagConfig(ngram_buckets=buckets, ngrams=4), spec, 3)
    ids = m4.bag_ids(x, lengths)
    real = (ids >= vocab).sum(dim=1).tolist()
    assert real == [3 + 2 + 1, 1]  # 4 tokens: 3 bigrams, 2 trigrams, 1 four-gram; 2 tokens: 1 bigram
    assert int(ids.max()) < vocab + buckets
    assert ids[1, 6:].tolist().count(0) == ids.shape[1] - 6 - 1  # n-grams past the text's end are padding
    tri = ids[0, 6 + 5 : 6 + 5 + 2]  # after the 5 bigram slots come the trigram slots
    assert tri[0] != tri[1] and bool((tri >= vocab).all())


def test_predict_cli_strings_and_lines(tmp_path):
    write_reviews(tmp_path / "r.csv", n=80)
    recipe = text_recipe(source="csv", path=str(tmp_path / "r.csv"), tokenizer={"kind": "word", "min_frequency": 1})
    recipe["model"] = {"name": "embedding-bag", "embedding_dim": 8}
    recipe["train"].update(epochs=10, optimizer={"name": "adamw", "lr": 0.05})
    api.train(validate_recipe(recipe), out=tmp_path / "run", progress=False)
    (tmp_path / "lines.txt").write_text("truly wonderful acting\n\nhated it\n", encoding="utf-8")
    res = run_cli("predict", str(tmp_path / "run"), "loved it", "--lines", str(tmp_path / "lines.txt"), "--json")
    assert res.returncode == 0, res.stderr
    preds = json.loads(res.stdout)["predictions"]
    assert [p["text"] for p in preds] == ["loved it", "truly wonderful acting", "hated it"]
    plain = run_cli("predict", str(tmp_path / "run"), "loved it")
    assert plain.stdout.startswith("loved it\t")
    none = run_cli("predict", str(tmp_path / "run"))
    assert none.returncode == 2 and "nothing to predict" in none.stderr


def test_text_run_resumes_bit_identically_after_a_kill(tmp_path):
    """Token batches, dropout and a mid-epoch SIGKILL: the resumed run ends with the uninterrupted run's weights."""
    import signal

    from safetensors.torch import load_file

    write_reviews(tmp_path / "r.csv", n=100)
    recipe = text_recipe(source="csv", path=str(tmp_path / "r.csv"), tokenizer={"kind": "bpe", "min_frequency": 1})
    recipe["model"].update(dropout=0.3)
    recipe["train"].update(epochs=2, checkpoint_every=3)
    (tmp_path / "r.yaml").write_text(json.dumps(recipe))
    run_cli("train", str(tmp_path / "r.yaml"), "--out", str(tmp_path / "ref"), "--no-progress", check=True)
    killed = run_cli(
        "train",
        str(tmp_path / "r.yaml"),
        "--out",
        str(tmp_path / "run"),
        "--no-progress",
        env={"BIGMODEL_FAULT": "kill_after_step:5"},
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    run_cli("train", "--resume", str(tmp_path / "run"), "--no-progress", check=True)
    a = load_file(str(tmp_path / "ref" / "model" / "model.safetensors"))
    b = load_file(str(tmp_path / "run" / "model" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "ref" / "model" / "tokenizer.json").read_text() == (
        tmp_path / "run" / "model" / "tokenizer.json"
    ).read_text()
