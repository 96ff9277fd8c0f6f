"""Seeded synthetic PII in sentences, to measure a masker's recall (and, with `benign`, its false detections).

Every value is valid where validity is defined: card numbers pass Luhn (Visa, Mastercard 51–55 and 2221–2720, Amex,
Discover), IBANs carry correct mod-97 check digits for their country's length, phone numbers are ones `phonenumbers`
calls valid (fixed line or mobile) in the regions Presidio matches, written internationally, nationally or E.164."""

from __future__ import annotations

import random
from dataclasses import dataclass

FIRST = ["anna", "li", "omar", "sofia", "jean", "priya", "lukas", "maria", "kenji", "zoe", "ahmed", "olga", "raj"]
LAST = ["smith", "muller", "garcia", "nguyen", "kowalski", "rossi", "tanaka", "okafor", "dubois", "silva", "cohen"]
DOMAINS = [
    "example.com",
    "mail.example.org",
    "uni-hamburg.de",
    "company.io",
    "post.co.uk",
    "shop.fr",
    "research.ac.uk",
    "my-isp.net",
    "startup.ai",
    "city.gov",
    "web.com.br",
    "clinic.ca",
]
WORDS = ["docs", "login", "a", "blog", "2024", "item", "search", "user", "files", "report", "index.html"]
# ISO 13616 lengths and BBAN layouts: n = digits, a = upper-case letters, c = letters or digits
IBAN_BBAN = {
    "DE": "18n",
    "GB": "4a14n",
    "FR": "10n11c2n",
    "ES": "20n",
    "NL": "4a10n",
    "IT": "1a10n12c",
    "CH": "5n12c",
    "BE": "12n",
    "AT": "16n",
    "PL": "24n",
    "SE": "20n",
    "IE": "4a14n",
    "PT": "21n",
    "DK": "14n",
    "NO": "11n",
}
PHONE_REGIONS = ("US", "GB", "DE", "FR", "IL", "IN", "CA", "BR")  # Presidio's PhoneRecognizer defaults
TEMPLATES = [
    "{v}",
    "Contact me at {v} tomorrow.",
    "my details: {v}, thanks!",
    "Please send it to {v} before Friday",
    "({v}) was in the log again.",
    "ok so {v} is the one",
    "Reply to {v}.",
]
BENIGN = [
    "The meeting moved to 2024-03-15 at 10:30, room 4B.",
    "It cost $1,299.99 plus 19% tax in 2015.",
    "Flight UA 1689 left gate 23 at 7:45 pm.",
    "Version 2.3.1 fixes 14 bugs; see section 4.2.",
    "We scored 3-1 and then 21-17 in the second half.",
    "Order 4412 shipped in 3 boxes weighing 12.5 kg.",
    "Chapter 7, verses 12 to 19, page 233.",
    "The temperature fell from 21.5 to -3 degrees overnight.",
    "I waited 45 minutes, e.g. three times longer than last year.",
    "Mr. Smith and Dr. Jones met at 9 a.m. on the 3rd floor.",
    "Our team of 12 grew to 1,500 people by 2019.",
    "Table 3 lists 256 samples; the mean was 0.734 with sd 0.12.",
    "He ran 5 km in 24:13, a personal best.",
    "Buy 2 get 1 free until 31/12; offer code SUMMER24.",
    "The 1990s gave us 56k modems and 3.5 inch disks.",
    "We flew on 02.27.2015 and came back 12/31/2015 (booking 2015-03-01).",
    "Population 8,336,817 in 2022; area 783.8 square km; GDP up 2.1 percent.",
    "Call it a day.It was fine, i.e. good enough for now.",
    "The score was 1-0, the ISBN 978-0-306-40615-7 and the zip code 90210.",
    "Room 1104, extension 4, floor 11, seat 23C, row 14.",
]


@dataclass(frozen=True)
class Case:
    type: str
    value: str
    text: str
    start: int  # the value's span in text

    @property
    def end(self) -> int:
        return self.start + len(self.value)


def _luhn_complete(digits: str) -> str:
    total = 0
    for i, d in enumerate(reversed(digits)):  # the check digit will be on the right: double every other from here
        n = int(d) * (2 if i % 2 == 0 else 1)
        total += n - 9 if n > 9 else n
    return digits + str((10 - total % 10) % 10)


def credit_card(r: random.Random) -> str:
    kind = r.choice(["visa", "mc5", "mc2", "amex", "discover"])
    if kind == "amex":
        num = _luhn_complete(r.choice(["34", "37"]) + "".join(r.choice("0123456789") for _ in range(12)))
        groups = [num[:4], num[4:10], num[10:]]
    else:
        prefix = {"visa": "4", "mc5": str(r.randint(51, 55)), "mc2": str(r.randint(2221, 2720)), "discover": "6011"}
        p = prefix[kind]
        num = _luhn_complete(p + "".join(r.choice("0123456789") for _ in range(15 - len(p))))
        groups = [num[i : i + 4] for i in range(0, 16, 4)]
    return r.choice([" ", "-", ""]).join(groups)


def iban(r: random.Random) -> str:
    country = r.choice(sorted(IBAN_BBAN))
    bban = ""
    spec = IBAN_BBAN[country]
    i = 0
    while i < len(spec):
        j = i
        while spec[j].isdigit():
            j += 1
        n, kind = int(spec[i:j]), spec[j]
        alphabet = {"n": "0123456789", "a": "ABCDEFGHIJKLMNOPQRSTUVWXYZ", "c": "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"}
        bban += "".join(r.choice(alphabet[kind]) for _ in range(n))
        i = j + 1
    numeric = "".join(str(int(c, 36)) for c in bban + country + "00")
    code = f"{country}{98 - int(numeric) % 97:02d}{bban}"
    if r.random() < 0.5:
        return code
    return " ".join(code[i : i + 4] for i in range(0, len(code), 4))


def phone(r: random.Random) -> str:
    import phonenumbers as pn

    while True:
        region = r.choice(PHONE_REGIONS)
        kind = r.choice([pn.PhoneNumberType.FIXED_LINE, pn.PhoneNumberType.MOBILE])
        example = pn.example_number_for_type(region, kind)
        if example is None:
            continue
        nat = str(example.national_number)
        keep = max(3, len(nat) - 4)  # the example's leading digits (area / operator code), random subscriber digits
        cand = nat[:keep] + "".join(r.choice("0123456789") for _ in range(len(nat) - keep))
        num = pn.parse("+" + str(example.country_code) + cand, None)
        if not pn.is_valid_number(num):
            continue
        fmt = r.choice([pn.PhoneNumberFormat.INTERNATIONAL, pn.PhoneNumberFormat.NATIONAL, pn.PhoneNumberFormat.E164])
        return pn.format_number(num, fmt)


def email(r: random.Random) -> str:
    f, last = r.choice(FIRST), r.choice(LAST)
    local = r.choice([f"{f}.{last}", f"{f}_{last}{r.randint(1, 99)}", f"{f[0]}{last}", f"{f}+news", f"{last}.{f}"])
    return f"{local}@{r.choice(DOMAINS)}"


def ip(r: random.Random) -> str:
    if r.random() < 0.6:
        return ".".join(str(x) for x in [r.randint(1, 223), r.randint(0, 255), r.randint(0, 255), r.randint(1, 254)])
    groups = [f"{r.randint(0, 0xFFFF):x}" for _ in range(8)]
    if r.random() < 0.5:
        return ":".join(groups)
    return ":".join(groups[:3]) + "::" + groups[-1]  # compressed


def url(r: random.Random) -> str:
    host = r.choice(DOMAINS)
    path = "/".join(r.choice(WORDS) for _ in range(r.randint(0, 3)))
    query = f"?id={r.randint(1, 9999)}" if r.random() < 0.3 else ""
    scheme = r.choice(["https://", "http://", "https://www.", "www."])
    return f"{scheme}{host}/{path}{query}" if path or query else f"{scheme}{host}"


GENERATORS = {"email": email, "phone": phone, "credit_card": credit_card, "iban": iban, "ip": ip, "url": url}


def cases(types: list[str], n: int, seed: int = 0) -> list[Case]:
    """`n` sentences per type, each holding one value of that type."""
    r = random.Random(seed)
    out = []
    for t in types:
        for _ in range(n):
            v = GENERATORS[t](r)
            template = r.choice(TEMPLATES)
            at = template.index("{v}")
            out.append(Case(t, v, template.replace("{v}", v), at))
    return out


def recall(masker: object, items: list[Case]) -> dict[str, float]:
    """Full-span recall per type: the share of values a detection of their type covers entirely."""
    hit: dict[str, int] = {}
    total: dict[str, int] = {}
    for c in items:
        total[c.type] = total.get(c.type, 0) + 1
        found = masker.find(c.text)  # type: ignore[attr-defined]
        if any(f.type == c.type and f.start <= c.start and f.end >= c.end for f in found):
            hit[c.type] = hit.get(c.type, 0) + 1
    return {t: hit.get(t, 0) / total[t] for t in total}
