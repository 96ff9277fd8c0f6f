"""Language modelling and translation: data, masks, caches, beam search, BLEU, Hugging Face parity, the CLI."""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from bigmodel import api
from bigmodel.config import TokenizerConfig, validate_recipe
from bigmodel.data.corpus import TokenStream, WindowLoader, carve_documents, encode_stream, train_lm_tokenizer
from bigmodel.data.parallel import BOS_ID, EOS_ID, read_ztext, strip_osis
from bigmodel.errors import UserError
from bigmodel.models.gpt import GPT, GPTConfig, copy_gpt_to_hf, generate
from bigmodel.models.seq2seq import Seq2SeqConfig, Seq2SeqTransformer
from conftest import LM_TEXT, run_cli, train_lm_fixture_run

TEXT = LM_TEXT


# ----------------------------------------------------------------------------------------------------- LM data
@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_lm_tokenizers_are_reversible(kind):
    tok = train_lm_tokenizer(
        TokenizerConfig(
            kind=kind, lowercase=False, normalization="none", vocab_size=300, min_frequency=1, add_cls=False
        ),
        TEXT,
    )
    sample = "Speak, speak.\n\n  You are all resolved?\n"
    ids = encode_stream(tok, sample).ids.tolist()
    assert tok.decode(ids) == sample
    assert encode_stream(tok, TEXT).ids.numel() > 0


def test_documents_are_carved_per_document_on_line_breaks():
    docs = ["".join(f"line {i} of a\n" for i in range(100)), "".join(f"row {i} of b\n" for i in range(50))]
    c = carve_documents(docs, 0.1, 0.2)
    assert c.train.count("of a") == 70 and c.val.count("of a") == 10 and c.test.count("of a") == 20
    assert c.train.count("of b") == 35 and c.test.count("of b") == 10
    # nothing lost, no line split between two splits:
    assert sorted((c.train + c.val + c.test).splitlines()) == sorted("".join(docs).splitlines())


def test_window_loader_shifts_targets_resumes_and_covers_eval_once():
    stream = TokenStream(torch.arange(1000))
    train = WindowLoader(stream, 16, 4, train=True, seed=3, batches=10)
    batches = list(train.epoch(2))
    assert len(batches) == 10
    x, y = batches[0]
    assert x.shape == (4, 16) and torch.equal(y, x + 1)
    tail = list(train.epoch(2, start=6))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches[6:], tail, strict=True))
    assert not torch.equal(batches[0][0], next(iter(train.epoch(3)))[0])
    ev = WindowLoader(stream, 16, 8, train=False)
    targets = torch.cat([b[1].flatten() for b in ev.epoch(0)])
    assert torch.equal(targets, torch.arange(1, 1 + len(targets)))  # each predicted once, in order
    assert len(targets) == (999 // 16) * 16


# ------------------------------------------------------------------------------------------------ HF parity
def test_gpt_matches_hugging_face_gpt2_logits_and_greedy_tokens():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=97, max_len=40, dim=48, num_heads=4, num_layers=3)
    ours = GPT(cfg).eval()
    hf_cfg = transformers.GPT2Config(
        vocab_size=97,
        n_positions=40,
        n_embd=48,
        n_layer=3,
        n_head=4,
        activation_function="gelu_new",
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        layer_norm_epsilon=1e-5,
        tie_word_embeddings=True,
    )
    hf = transformers.GPT2LMHeadModel(hf_cfg).eval()
    copy_gpt_to_hf(ours, hf)
    ids = torch.randint(0, 97, (2, 17))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(ids).logits, atol=1e-4, rtol=1e-4)
        a = generate(ours, ids[:1], 20, temperature=0)
        b = hf.generate(
            ids[:1], max_new_tokens=20, do_sample=False, pad_token_id=0, attention_mask=torch.ones_like(ids[:1])
        )
    assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------- LM end to end
@pytest.fixture(scope="module")
def lm_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lm")
    run = train_lm_fixture_run(folder)
    return folder, SimpleNamespace(run_dir=run, metrics=json.loads((run / "summary.json").read_text())["metrics"])


def test_language_model_trains_evaluates_and_generates(lm_run):
    folder, res = lm_run
    assert res.metrics["perplexity"] < 2  # from ~30 characters' uniform perplexity: the dialogue is learned
    proc = run_cli("evaluate", str(res.run_dir), "--json", check=True)
    m = json.loads(proc.stdout)
    assert m["loss"] == pytest.approx(res.metrics["loss"]) and m["perplexity"] == pytest.approx(
        res.metrics["perplexity"]
    )
    assert m["num_tokens"] > 0
    a = run_cli("generate", str(res.run_dir), "--prompt", "First", "-n", "60", "--seed", "5", check=True).stdout
    b = run_cli(
        "generate", str(res.run_dir), "--prompt", "First", "-n", "60", "--seed", "5", "--no-stream", check=True
    ).stdout
    assert a == b and a.startswith("First") and len(a) > 40
    greedy = run_cli("generate", str(res.run_dir), "-p", "All:\n", "-t", "0", "-n", "30", check=True).stdout
    answer = greedy.split("\n")[1]
    assert answer in ("Speak, speak.", "Resolved. resolved.")  # the two lines "All:" says in the corpus
    stopped = run_cli(
        "generate", str(res.run_dir), "-p", "All:\n", "-t", "0", "-n", "30", "--stop", ",", check=True
    ).stdout
    assert "," not in stopped and greedy.startswith(stopped.rstrip("\n"))


def test_generate_rejects_a_classifier_and_bad_options(lm_run, tmp_path):
    from conftest import train_text_fixture_run

    clf = train_text_fixture_run(tmp_path)
    proc = run_cli("generate", str(clf), "-p", "hi")
    assert proc.returncode == 2 and "needs a language model" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_cli("translate", str(lm_run[1].run_dir), "hello")
    assert proc.returncode == 2 and "translation run" in proc.stderr


def test_pretrain_then_fine_tune_starts_from_the_pretrained_weights(lm_run, tmp_path):
    folder, res = lm_run
    rows = ["text,label"] + [
        f'"{t}",{lbl}' for i in range(40) for t, lbl in [(("Speak, speak.", "a"), ("Resolved. resolved.", "b"))[i % 2]]
    ]
    (tmp_path / "c.csv").write_text("\n".join(rows) + "\n")
    recipe = validate_recipe(
        {
            "task": "text_classification",
            "data": {"source": "csv", "path": str(tmp_path / "c.csv"), "tokenizer": {"max_length": 24}},
            "model": {"name": "gpt-classifier", "init_from": str(res.run_dir)},
            "train": {"epochs": 1, "batch_size": 8},
        }
    )
    exp = api.build_experiment(recipe)
    pre = api.load_artifact(res.run_dir)
    for k, v in pre.model.state_dict().items():
        assert torch.equal(exp.model.state_dict()["gpt." + k], v)
    assert exp.preprocess.tokenizer.get_vocab() == pre.preprocess.tokenizer.get_vocab()
    out = api.train(recipe, out=tmp_path / "ft", progress=False)
    cfg = json.loads((out.run_dir / "model" / "config.json").read_text())
    assert cfg["model"]["dim"] == 32 and cfg["model"]["num_layers"] == 2  # the architecture came from the run
    assert api.predict(out.run_dir, texts=["Speak, speak."])[0]["label"] in ("a", "b")
    bad = validate_recipe(
        {**recipe.to_dict(), "model": {"name": "gpt-classifier", "init_from": str(res.run_dir), "dim": 64}}
    )
    with pytest.raises(UserError, match="model.dim is 64 but the pretrained run"):
        api.build_experiment(bad)


# -------------------------------------------------------------------------------------------------- seq2seq
@pytest.fixture
def s2s():
    torch.manual_seed(0)
    spec = {"kind": "translation", "src_vocab_size": 40, "tgt_vocab_size": 40, "shared_vocab": True, "max_length": 16}
    return Seq2SeqTransformer(
        Seq2SeqConfig(dim=32, num_heads=4, encoder_layers=2, decoder_layers=2, dropout=0.0), spec
    ).eval()


def test_decoder_is_causal_and_source_padding_is_ignored(s2s):
    src = torch.randint(5, 40, (2, 7))
    lengths = torch.tensor([7, 4])
    tgt = torch.randint(5, 40, (2, 6))
    base = s2s(src, lengths, tgt)
    changed = tgt.clone()
    changed[:, 4:] = torch.randint(5, 40, (2, 2))
    out = s2s(src, lengths, changed)
    torch.testing.assert_close(out[:, :4], base[:, :4], atol=1e-5, rtol=1e-5)  # no attention to the future
    padded = src.clone()
    padded[1, 4:] = torch.randint(5, 40, (3,))  # garbage after the second source's length
    torch.testing.assert_close(s2s(padded, lengths, tgt), base, atol=1e-5, rtol=1e-5)


def test_incremental_decoding_equals_the_full_decoder(s2s):
    src = torch.randint(5, 40, (3, 6))
    lengths = torch.tensor([6, 3, 5])
    tgt = torch.cat([torch.full((3, 1), BOS_ID), torch.randint(5, 40, (3, 5))], dim=1)
    full = s2s(src, lengths, tgt).float().log_softmax(-1)
    memory, pad = s2s.encode(src, lengths)
    state = s2s._decoder_state(memory, pad)
    steps = torch.stack([s2s._step(tgt[:, t], state) for t in range(tgt.shape[1])], dim=1)
    torch.testing.assert_close(steps, full, atol=1e-5, rtol=1e-5)


class ToyDecoder(Seq2SeqTransformer):
    """Next-token probabilities fixed by the history: greedy takes A (0.6) and then nothing better than 0.3;
    the best sequence is B then [EOS] (0.4 x 0.9 = 0.36 > 0.6 x 0.3 = 0.18)."""

    A, B, C = 10, 11, 12

    def encode(self, src, src_lengths):  # noqa: ANN001, ANN201
        return torch.zeros(src.shape[0], 1, 1), torch.zeros(src.shape[0], 1, dtype=torch.bool)

    def _decoder_state(self, memory, pad):  # noqa: ANN001, ANN201
        return {"hist": torch.zeros(memory.shape[0], 0, dtype=torch.int64)}

    def _step(self, tokens, state):  # noqa: ANN001, ANN201
        V = 40
        hist = torch.cat([state["hist"], tokens[:, None]], dim=1)
        state["hist"] = hist
        p = torch.full((tokens.shape[0], V), 1e-6)
        for i, h in enumerate(hist.tolist()):
            h = h[1:]  # drop [BOS]
            if not h:
                p[i, self.A], p[i, self.B] = 0.6, 0.4
            elif h == [self.A]:
                p[i, self.C], p[i, EOS_ID], p[i, self.A] = 0.3, 0.3, 0.3
            elif h == [self.B]:
                p[i, EOS_ID], p[i, self.C] = 0.9, 0.1
            else:
                p[i, EOS_ID] = 1.0
        return (p / p.sum(-1, keepdim=True)).log()

    @staticmethod
    def _reorder(state, idx):  # noqa: ANN001, ANN205
        state["hist"] = state["hist"][idx]


def test_beam_search_finds_the_known_best_sequence_greedy_misses(s2s):
    toy = ToyDecoder(s2s.cfg, {"src_vocab_size": 40, "tgt_vocab_size": 40, "max_length": 16})
    src, lengths = torch.ones(2, 3, dtype=torch.int64), torch.tensor([3, 3])
    assert toy.greedy(src, lengths, 5)[0][0] == ToyDecoder.A
    assert toy.beam_search(src, lengths, beam_size=2, max_new_tokens=5, length_penalty=0.0) == [[ToyDecoder.B]] * 2


def test_bleu_on_known_pairs():
    import sacrebleu

    refs = ["the cat sat on the mat", "there is a dog in the house"]
    assert sacrebleu.corpus_bleu(refs, [refs]).score == pytest.approx(100.0)
    assert sacrebleu.corpus_bleu(["xyz qqq", "abc def"], [refs]).score == pytest.approx(0.0)
    # by hand: 4/6 unigrams, 3/5 bigrams, 2/4 trigrams, 1/3 4-grams match, same length (no brevity penalty):
    # BLEU = (4/6 · 3/5 · 2/4 · 1/3)^(1/4) = 0.5081
    partial = sacrebleu.corpus_bleu(["the cat sat on a rug"], [["the cat sat on the mat"]]).score
    assert partial == pytest.approx(100 * (4 / 6 * 3 / 5 * 2 / 4 * 1 / 3) ** 0.25, abs=0.01)


# ------------------------------------------------------------------------------------------------ SWORD zText
def write_ztext(folder: Path, verses: dict[str, list[str]]) -> None:
    """A SWORD zText module in the real byte layout: one zlib block per testament, entries indexed by .bzv."""
    folder.mkdir(parents=True)
    for testament, entries in verses.items():
        raw = b""
        index = b""
        for e in entries:
            data = e.encode("utf-8")
            index += struct.pack("<IIH", 0, len(raw), len(data))
            raw += data
        comp = zlib.compress(raw)
        (folder / f"{testament}.bzz").write_bytes(comp)
        (folder / f"{testament}.bzs").write_bytes(struct.pack("<III", 0, len(comp), len(raw)))
        (folder / f"{testament}.bzv").write_bytes(index)


def test_ztext_reader_and_osis_stripping(tmp_path, monkeypatch):
    from bigmodel.data.parallel import bible_pairs

    en = {
        "ot": [
            "",
            '<chapter n="1"/>',
            'In the <w lemma="strong:H7225">beginning</w> God created .',
            '<title type="main">Heading</title>And &amp; it was so<note>a note</note>.',
        ],
        "nt": ["Amen ."],
    }
    es = {"ot": ["", '<chapter n="1"/>', "<w>EN el principio</w> crió Dios .", "Y fué así."], "nt": ["Amén."]}
    write_ztext(tmp_path / "engKJV2006eb", en)
    write_ztext(tmp_path / "spaRV1909eb", es)
    assert read_ztext(tmp_path / "engKJV2006eb")[2].startswith("In the <w")
    assert strip_osis(en["ot"][3]) == "And & it was so."
    pairs = bible_pairs(tmp_path)
    assert pairs == [
        ("In the beginning God created.", "EN el principio crió Dios."),
        ("And & it was so.", "Y fué así."),
        ("Amen.", "Amén."),
    ]
    monkeypatch.setenv("BIGMODEL_SWORD_ROOT", str(tmp_path / "nowhere"))
    with pytest.raises(UserError, match="sword-text-kjv"):
        bible_pairs()


@pytest.mark.skipif(
    not Path("/usr/share/sword/modules/texts/ztext/engKJV2006eb").is_dir(),
    reason="Debian sword-text-kjv / sword-text-sparv not installed (scripts/setup.sh installs them)",
)
def test_the_bundled_bible_gives_31k_aligned_verse_pairs():
    from bigmodel.data.parallel import bible_pairs

    pairs = bible_pairs()
    assert len(pairs) == EXPECTED_BIBLE_PAIRS
    assert pairs[0] == (
        "In the beginning God created the heaven and the earth.",
        "EN el principio crió Dios los cielos y la tierra.",
    )
    assert not any("<" in a or "<" in b for a, b in pairs)


EXPECTED_BIBLE_PAIRS = 31_084


# ------------------------------------------------------------------------------------------ translation e2e
def test_translation_trains_translates_and_scores(tmp_path):
    import random

    rng = random.Random(0)
    words = {
        "red": "rojo",
        "blue": "azul",
        "dog": "perro",
        "cat": "gato",
        "house": "casa",
        "big": "grande",
        "the": "el",
        "sees": "ve",
        "small": "chico",
    }
    lines = []
    for _ in range(500):
        s = [rng.choice(list(words)) for _ in range(rng.randint(2, 5))]
        lines.append(" ".join(s) + "\t" + " ".join(words[w] for w in s))
    (tmp_path / "p.tsv").write_text("\n".join(lines) + "\n")
    recipe = {
        "task": "translation",
        "data": {
            "source": "tsv",
            "path": str(tmp_path / "p.tsv"),
            "val_fraction": 0.1,
            "test_fraction": 0.1,
            "tokenizer": {"vocab_size": 400, "max_length": 24, "min_frequency": 1},
        },
        "model": {
            "name": "transformer-seq2seq",
            "dim": 64,
            "num_heads": 4,
            "encoder_layers": 2,
            "decoder_layers": 2,
            "dropout": 0.0,
        },
        "train": {"epochs": 40, "batch_size": 32, "optimizer": {"lr": 0.003}, "precision": "fp32"},
    }
    res = api.train(validate_recipe(recipe), out=tmp_path / "run", progress=False)
    assert res.metrics["bleu"] > 50 and res.metrics["chrf"] > 60
    pairs = [line.split("\t") for line in lines[:20]]
    out = run_cli("translate", str(res.run_dir), *[a for a, _ in pairs], "--beam-size", "3", check=True)
    got = out.stdout.splitlines()
    assert sum(g == b for g, (_, b) in zip(got, pairs, strict=True)) >= 15, list(zip(got, pairs, strict=True))
    assert got == api.load_artifact(res.run_dir).translate([a for a, _ in pairs], beam_size=3)
    beam4 = api.load_artifact(res.run_dir).translate([pairs[0][0]])  # the model's default beam (4)
    assert run_cli("predict", str(res.run_dir), pairs[0][0], check=True).stdout.splitlines() == beam4
    m = json.loads(run_cli("evaluate", str(res.run_dir), "--json", "--beam-size", "1", check=True).stdout)
    assert m["beam_size"] == 1 and m["bleu"] > 50 and m["num_sentences"] == 50
    # tgt ids start with [BOS], sources end with [EOS]
    data, _ = api.prepare_data(validate_recipe(recipe), api.load_artifact(res.run_dir).preprocess)
    assert int(data.train.tgt[0, 0]) == BOS_ID and EOS_ID in data.train.src[0].tolist()


def test_translation_recipe_errors(tmp_path, write_recipe):
    (tmp_path / "bad.tsv").write_text("hello\thola\nno tab here\n")
    r = write_recipe(
        {
            "task": "translation",
            "data": {"source": "tsv", "path": str(tmp_path / "bad.tsv")},
            "model": {"name": "transformer-seq2seq"},
        }
    )
    proc = run_cli("train", str(r))
    assert proc.returncode == 2 and "line 2" in proc.stderr and "source<TAB>target" in proc.stderr
    r = write_recipe({"task": "translation", "data": {"source": "tweets"}, "model": {"name": "transformer-seq2seq"}})
    proc = run_cli("recipe", "validate", str(r))
    assert proc.returncode == 2 and "does not apply to task 'translation'" in proc.stderr
    r = write_recipe(
        {
            "task": "language_modeling",
            "data": {"source": "shakespeare", "tokenizer": {"kind": "word"}},
            "model": {"name": "gpt"},
        }
    )
    proc = run_cli("recipe", "validate", str(r))
    assert proc.returncode == 2 and "reversible tokenizer" in proc.stderr


def test_separate_vocabularies_train_save_and_translate(tmp_path):
    lines = [
        f"{a} {b}\t{c} {d}"
        for a, c in (("red", "rojo"), ("blue", "azul"))
        for b, d in (("dog", "perro"), ("cat", "gato"))
    ] * 20
    (tmp_path / "p.tsv").write_text("\n".join(lines) + "\n")
    recipe = validate_recipe(
        {
            "task": "translation",
            "data": {
                "source": "tsv",
                "path": str(tmp_path / "p.tsv"),
                "shared_vocab": False,
                "reverse": True,
                "tokenizer": {"vocab_size": 300, "max_length": 16, "min_frequency": 1},
            },
            "model": {
                "name": "transformer-seq2seq",
                "dim": 32,
                "num_heads": 2,
                "encoder_layers": 1,
                "decoder_layers": 1,
            },
            "train": {"epochs": 1, "batch_size": 16},
        }
    )
    res = api.train(recipe, out=tmp_path / "run", progress=False)
    art = api.load_artifact(res.run_dir)
    assert (res.run_dir / "model" / "target_tokenizer.json").is_file()
    src_vocab, tgt_vocab = art.preprocess.tokenizer.get_vocab(), art.preprocess.target_tokenizer.get_vocab()
    assert any("rojo" in t for t in src_vocab) and not any("rojo" in t for t in tgt_vocab)  # reversed: es → en
    assert art.model.src_embed is not art.model.tgt_embed
    assert len(art.translate(["rojo perro"], beam_size=2)) == 1


def test_export_and_compress_refuse_a_language_model_clearly(lm_run, tmp_path):
    for args in (("export", "--format", "onnx"), ("compress", "--method", "quantize")):
        proc = run_cli(args[0], str(lm_run[1].run_dir), *args[1:], "--out", str(tmp_path / args[0]))
        assert proc.returncode == 2 and "supports classifiers" in proc.stderr and "Traceback" not in proc.stderr
