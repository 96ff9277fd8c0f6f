"""PII masking with Microsoft Presidio, offline.

Presidio's analyzer finds the values (regular expressions plus checksums: Luhn for cards, mod-97 for IBANs, Google's
`phonenumbers` for phone numbers, `ipaddress` for IPs), its anonymizer replaces them and resolves overlaps (an email's
domain is not also a URL). Three things keep it offline and correct here:

- the NLP engine is a blank spaCy English pipeline (tokenisation only), or a spaCy pipeline folder the recipe names
  (`data.pii_model`) for the named-entity types (person, location, organization); Presidio's default engine would
  download `en_core_web_lg`;
- the email recognizer validates domains against `tldextract`'s bundled public-suffix snapshot: its default
  extractor fetches the list from the network on first use (Presidio #1205: minute-long hangs offline);
- the credit-card pattern also takes Mastercard's 2-series (2221–2720, issued since 2017; Presidio's pattern starts
  at 3, 4, 5, 6 or 1), and phone numbers need ≥ 7 national digits and a dialable type (`phonenumbers` calls
  `flight 1689` a valid German pager number), and `day.It` (a missing space) is no URL.

`mask_style`: `tag` (`<EMAIL>`), `redact` (the value removed), `hash` (`<EMAIL:3f9a0c1d2e>`, an HMAC-SHA256 keyed by
the secret in `BIGMODEL_PII_SALT`: the same value gives the same token, and without the secret nobody can enumerate
phone numbers to undo it — an unsalted hash of a phone number can be).
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import logging
import os
import re
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bigmodel.errors import UserError

# recipe name → Presidio entity
PATTERN_TYPES = {
    "email": "EMAIL_ADDRESS",
    "phone": "PHONE_NUMBER",
    "credit_card": "CREDIT_CARD",
    "iban": "IBAN_CODE",
    "ip": "IP_ADDRESS",
    "url": "URL",
    "mac": "MAC_ADDRESS",
    "crypto": "CRYPTO",
    "us_ssn": "US_SSN",
    "uk_nhs": "UK_NHS",
}
NER_TYPES = {"person": "PERSON", "location": "LOCATION", "organization": "ORGANIZATION"}
PII_TYPES = PATTERN_TYPES | NER_TYPES
STYLES = ("tag", "hash", "redact")
SALT_ENV = "BIGMODEL_PII_SALT"
_NAME = {v: k for k, v in PII_TYPES.items()}
_CHUNK = 20_000  # characters per analyzer call (spaCy refuses documents over 1,000,000)
_NOT_PHONE = re.compile(r"\(?\d{1,3}(?:\.\d{1,3}){3}\)?|\d{1,2}([./-])\d{1,2}\1\d{2,4}|\d{4}([./-])\d{1,2}\2\d{1,2}")
_SCORE = 0.3  # Presidio's weakest pattern score; validated values score 1.0, checksum failures 0 (dropped)


def check_types(types: list[str], model: Path | None) -> None:
    """Raise ValueError (a recipe error) for an unknown type, or a named-entity type without a model."""
    for t in types:
        if t not in PII_TYPES:
            raise ValueError(f"unknown PII type {t!r} (known: {', '.join(PII_TYPES)})")
    ner = [t for t in types if t in NER_TYPES]
    if ner and model is None:
        raise ValueError(
            f"PII type(s) {', '.join(ner)} need a named-entity model: set data.pii_model to a spaCy pipeline folder "
            "(none can be downloaded here)"
        )


@dataclass(frozen=True)
class Found:
    type: str  # the recipe name (email, phone, ...)
    start: int
    end: int


def _require() -> None:
    try:
        import presidio_analyzer  # noqa: F401
        import presidio_anonymizer  # noqa: F401
    except ImportError:
        raise UserError(
            "PII masking needs Microsoft Presidio: pip install 'bigmodel[privacy]' "
            "(presidio-analyzer, presidio-anonymizer)"
        ) from None


def _recognizers(types: list[str]) -> list[Any]:
    import phonenumbers
    import tldextract
    from presidio_analyzer import Pattern, RecognizerResult
    from presidio_analyzer import predefined_recognizers as pr

    offline = tldextract.TLDExtract(suffix_list_urls=(), cache_dir=None)  # the bundled snapshot, no network

    class Email(pr.EmailRecognizer):
        def validate_result(self, pattern_text: str) -> bool:
            return offline(pattern_text.rsplit("@", 1)[-1]).fqdn != ""

    class CreditCard(pr.CreditCardRecognizer):
        PATTERNS = [
            *pr.CreditCardRecognizer.PATTERNS,
            Pattern(
                "Mastercard 2-series",
                r"\b(2(?:22[1-9]|2[3-9]\d|[3-6]\d\d|7[01]\d|720))[- ]?(\d{4})[- ]?(\d{4})[- ]?(\d{4})\b",
                0.3,
            ),
        ]

    class Url(pr.UrlRecognizer):
        def validate_result(self, pattern_text: str) -> bool | None:
            """`day.It` (a sentence without its space; `.it` is Italy's domain) is not a URL."""
            return False if re.fullmatch(r"[a-z]+\.[A-Z][a-z]*", pattern_text) else None

    dialable = {
        phonenumbers.PhoneNumberType.FIXED_LINE,
        phonenumbers.PhoneNumberType.MOBILE,
        phonenumbers.PhoneNumberType.FIXED_LINE_OR_MOBILE,
        phonenumbers.PhoneNumberType.TOLL_FREE,
        phonenumbers.PhoneNumberType.PREMIUM_RATE,
        phonenumbers.PhoneNumberType.SHARED_COST,
        phonenumbers.PhoneNumberType.VOIP,
        phonenumbers.PhoneNumberType.PERSONAL_NUMBER,
        phonenumbers.PhoneNumberType.UAN,
    }

    class Phone(pr.PhoneRecognizer):
        def analyze(self, text: str, entities: list[str], nlp_artifacts: Any = None) -> list[RecognizerResult]:
            return [r for r in super().analyze(text, entities, nlp_artifacts) if self._dialable(text[r.start : r.end])]

        def _dialable(self, span: str) -> bool:
            """Valid in one of the regions with a dialable type and ≥ 7 national digits, and neither an IPv4 address
            nor a date (`phonenumbers` takes `(82.114.25.176)` and `02.27.2015` for valid numbers)."""
            if _NOT_PHONE.fullmatch(span.strip()):
                return False
            for region in [None] if span.startswith("+") else self.supported_regions:
                try:
                    num = phonenumbers.parse(span, region)
                except phonenumbers.NumberParseException:
                    continue
                if (
                    phonenumbers.is_valid_number(num)
                    and phonenumbers.number_type(num) in dialable
                    and len(str(num.national_number)) >= 7
                ):
                    return True
            return False

    make = {
        "email": Email,
        "phone": Phone,
        "credit_card": CreditCard,
        "iban": pr.IbanRecognizer,
        "ip": pr.IpRecognizer,
        "url": Url,
        "mac": pr.MacAddressRecognizer,
        "crypto": pr.CryptoRecognizer,
        "us_ssn": pr.UsSsnRecognizer,
        "uk_nhs": pr.NhsRecognizer,
    }
    out = [make[t]() for t in types if t in make]
    ner = [NER_TYPES[t] for t in types if t in NER_TYPES]
    if ner:
        out.append(pr.SpacyRecognizer(supported_entities=ner))
    return out


class PIIMasker:
    """Finds and replaces the PII `types` in text (see the module docstring)."""

    def __init__(self, types: list[str], style: str = "tag", model: Path | None = None) -> None:
        try:
            check_types(types, model)
        except ValueError as e:
            raise UserError(str(e)) from None
        if style not in STYLES:
            raise UserError(f"mask_style {style!r}: expected one of {', '.join(STYLES)}")
        _require()
        import spacy
        from presidio_analyzer import AnalyzerEngine, RecognizerRegistry
        from presidio_analyzer.nlp_engine import SpacyNlpEngine
        from presidio_anonymizer import AnonymizerEngine
        from presidio_anonymizer.entities import OperatorConfig

        for name in ("presidio-analyzer", "presidio-anonymizer"):
            logging.getLogger(name).setLevel(logging.ERROR)
        self.types = list(dict.fromkeys(types))
        self.style = style
        if model is not None and not Path(model).is_dir():
            raise UserError(f"data.pii_model {model}: folder not found (expected a spaCy pipeline folder)")

        class Engine(SpacyNlpEngine):
            def load(self) -> None:  # a blank or local pipeline: never spacy.cli.download
                self.nlp = {"en": spacy.load(model) if model is not None else spacy.blank("en")}

        engine = Engine(models=[{"lang_code": "en", "model_name": str(model or "blank:en")}])
        engine.load()
        registry = RecognizerRegistry(supported_languages=["en"])
        for r in _recognizers(self.types):
            registry.add_recognizer(r)
        self._analyzer = AnalyzerEngine(registry=registry, nlp_engine=engine, supported_languages=["en"])
        self._entities = [PII_TYPES[t] for t in self.types]
        self._anonymizer = AnonymizerEngine()
        self._keep = {e: OperatorConfig("keep", {}) for e in self._entities}
        if style == "hash":
            salt = os.environ.get(SALT_ENV, "")
            if len(salt) < 16:
                raise UserError(
                    f"mask_style hash needs a secret of ≥ 16 characters in {SALT_ENV} (an unsalted hash of a phone "
                    "number is undone by trying every number); use the same secret at predict and serve time"
                )
            key = salt.encode()

            def keyed(name: str) -> Any:
                return lambda v: f"<{name.upper()}:{hmac.new(key, v.encode(), hashlib.sha256).hexdigest()[:10]}>"

            self._ops = {PII_TYPES[t]: OperatorConfig("custom", {"lambda": keyed(t)}) for t in self.types}
        elif style == "redact":
            self._ops = {PII_TYPES[t]: OperatorConfig("redact", {}) for t in self.types}
        else:
            self._ops = {PII_TYPES[t]: OperatorConfig("replace", {"new_value": f"<{t.upper()}>"}) for t in self.types}

    def _analyze(self, text: str) -> list[Any]:
        return self._analyzer.analyze(text, language="en", entities=self._entities, score_threshold=_SCORE)

    def find(self, text: str) -> list[Found]:
        """The PII values in `text` after the anonymizer resolved overlaps (what `mask` replaces), in order. The
        `keep` operator leaves the text as it is, so the anonymizer's output offsets are the input's."""
        out = []
        for start, piece in _pieces(text):
            found = self._analyze(piece)
            if found:
                res = self._anonymizer.anonymize(piece, found, self._keep)
                out.extend(Found(_NAME[i.entity_type], start + i.start, start + i.end) for i in res.items)
        return sorted(out, key=lambda f: f.start)

    def mask(self, text: str) -> tuple[str, Counter[str]]:
        """`text` with every PII value replaced, and how many of each type were replaced."""
        counts: Counter[str] = Counter()
        return "".join(self.mask_stream([text], counts)), counts

    def mask_stream(self, parts: Iterable[str], counts: Counter[str]) -> Iterator[str]:
        """`mask("".join(parts))`, a piece at a time (the pieces `_pieces` cuts the whole into: ≤ ~_CHUNK characters
        ending at line breaks), adding to `counts`: a split of a corpus is masked without being held."""
        buf, pos = "", 0
        for part in parts:
            buf, pos = buf[pos:] + part, 0
            while len(buf) - pos > _CHUNK:
                j = buf.rfind("\n", pos, pos + _CHUNK)
                j = j + 1 if j > pos else pos + _CHUNK
                yield self._mask_piece(buf[pos:j], counts)
                pos = j
        if pos < len(buf):
            yield self._mask_piece(buf[pos:], counts)

    def _mask_piece(self, piece: str, counts: Counter[str]) -> str:
        found = self._analyze(piece)
        if not found:
            return piece
        res = self._anonymizer.anonymize(piece, found, self._ops)
        counts.update(_NAME[i.entity_type] for i in res.items)
        return res.text

    def mask_all(self, texts: list[str]) -> tuple[list[str], Counter[str]]:
        counts: Counter[str] = Counter()
        out = []
        for t in texts:
            m, c = self.mask(t)
            out.append(m)
            counts.update(c)
        return out, counts


def _pieces(text: str) -> list[tuple[int, str]]:
    """(offset, piece) of ≤ ~_CHUNK characters ending at line breaks (a value never spans lines here)."""
    if len(text) <= _CHUNK:
        return [(0, text)]
    out, i = [], 0
    while i < len(text):
        j = text.rfind("\n", i, i + _CHUNK)
        j = len(text) if i + _CHUNK >= len(text) else (j + 1 if j > i else i + _CHUNK)
        out.append((i, text[i:j]))
        i = j
    return out


@functools.lru_cache(maxsize=4)
def masker(types: tuple[str, ...], style: str, model: str | None) -> PIIMasker:
    return PIIMasker(list(types), style, Path(model) if model else None)


def masker_for(cfg: Any) -> PIIMasker | None:
    """The masker a data block asks for (`data.mask_pii`), or None."""
    types = tuple(getattr(cfg, "mask_pii", None) or ())
    if not types:
        return None
    model = getattr(cfg, "pii_model", None)
    return masker(types, cfg.mask_style, str(model) if model else None)


def mask_splits(cfg: Any, data: Any, fields: tuple[str, ...]) -> Any:
    """Mask the text `fields` of every split of `data` in place (`data.mask_pii`) and record the counts per type in
    `data.pii_masked` (every requested type, zeros included)."""
    m = masker_for(cfg)
    if m is None:
        return data
    counts: Counter[str] = Counter()
    for name in ("train", "val", "test"):
        split = getattr(data, name)
        if split is None:
            continue
        if isinstance(split, str):
            masked, c = m.mask(split)
            setattr(data, name, masked)
            counts.update(c)
            continue
        for f in fields:
            masked_list, c = m.mask_all(getattr(split, f))
            setattr(split, f, masked_list)
            counts.update(c)
    data.pii_masked = {t: counts.get(t, 0) for t in m.types}
    return data


def read_texts(path: Path, column: str = "text", encoding: str = "utf-8") -> list[str]:
    """The texts of a file: a CSV/TSV column, a JSONL key, or the lines of any other text file."""
    import csv
    import json
    import sys

    if not path.is_file():
        raise UserError(f"{path}: file not found")
    suffix = path.suffix.lower()
    try:
        with path.open(newline="", encoding=encoding) as f:
            if suffix in (".csv", ".tsv"):
                csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
                reader = csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ",")
                if column not in (reader.fieldnames or []):
                    raise UserError(f"{path}: no column {column!r} (columns: {reader.fieldnames}); use --column")
                return [row[column] or "" for row in reader]
            if suffix == ".jsonl":
                out = []
                for i, line in enumerate(f, 1):
                    if line.strip():
                        try:
                            obj = json.loads(line)
                        except json.JSONDecodeError:
                            raise UserError(f"{path}: line {i}: not JSON") from None
                        if not isinstance(obj, dict) or not isinstance(obj.get(column), str):
                            raise UserError(f"{path}: line {i}: no string {column!r} key; use --column")
                        out.append(obj[column])
                return out
            return f.read().splitlines()
    except UnicodeDecodeError:
        raise UserError(f"{path}: not {encoding} text (try --encoding latin-1)") from None


def scan(texts: list[str], types: list[str], model: Path | None = None, examples: int = 5) -> dict[str, Any]:
    """What PII `texts` hold: counts per type, how many texts hold any, and the first `examples` of those, masked
    (tags: the values themselves are never printed)."""
    m = PIIMasker(types, "tag", model)
    counts: Counter[str] = Counter()
    shown: list[str] = []
    with_pii = 0
    for t in texts:
        masked, c = m.mask(t)
        if c:
            with_pii += 1
            counts.update(c)
            if len(shown) < examples:
                shown.append(masked)
    return {
        "texts": len(texts),
        "texts_with_pii": with_pii,
        "counts": {t: counts.get(t, 0) for t in m.types},
        "examples": shown,
    }
