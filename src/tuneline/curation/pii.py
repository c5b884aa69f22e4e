"""Detect and redact personal data (PII) in free text.

Used by the curation stage and, later, by the server to redact request logs, so this module
imports only a little of the standard library (``re``, ``dataclasses``) and is cheap to import.

What is detected (``PII_TYPES``), each validated, not just pattern-matched:

``email``
    ``local@domain.tld`` with an ASCII local part (letters, digits, ``._%+-``), dotted
    domain labels and an alphabetic TLD of two or more letters.
``phone``
    * international: ``+`` and a country code (``+44 20 7946 0958``, ``+1-415-555-0132``,
      ``+44 (0)20 7946 0958``, ``+442079460958``) with 8-15 digits, or ``00`` and a country
      code with separators (``0044 20 7946 0958``);
    * North American national forms with separators: ``(415) 555-0132``, ``415-555-0132``,
      ``415.555.0132``, ``1-800-555-0199``;
    * national forms with a leading trunk ``0`` and separators, 9-12 digits:
      ``020 7946 0958``, ``07700 900123``, ``06 12 34 56 78``, ``030 12345678``.

    Deliberately not phones: bare digit runs without ``+`` (order numbers, IDs), digit
    groups that read as a date with a four-digit year, thousands-grouped amounts
    (``1 250 000 000``), SSN-shaped ``AAA-GG-SSSS`` numbers, dotted quads (IPs), numbers
    glued to a currency sign, ``%``, letters or another number. National formats without
    a trunk ``0`` other than the North American one (e.g. Spanish ``612 34 56 78``) are
    not recognised.
``card``
    13-19 digits, unseparated or grouped 4-4-4-4(-3) or 4-6-5 / 4-6-4 with single spaces
    or dashes, passing the Luhn check and starting like a payment card: 3-6 (Amex, Diners,
    JCB, Visa, Mastercard, Discover, UnionPay) or 2200-2204 / 2221-2720 (Mir, Mastercard),
    so compact timestamps such as ``20240115103045`` are not cards. Numbers of one repeated
    digit are ignored.
``iban``
    The code of a country that uses IBANs, two check digits, and the country's exact IBAN
    length (the BBAN's own layout is not checked), with or without spaces, all upper or
    all lower case, passing the ISO 7064 mod-97 check.
``ip``
    IPv4 with four 0-255 octets (no leading zeros), not part of a longer dotted number and
    not right after the word ``version``/``release``/``build``/``ver``; IPv6 in full or ``::``-compressed
    form (with an optional trailing IPv4). Compressed forms need at least two groups, one
    of them three or more hex digits, so ``::1`` and slice-like ``1::2`` are not matched.
``national_id``
    Only two kinds, both validated: US Social Security numbers written ``AAA-GG-SSSS``
    (area 000, 666 and 900-999, group 00 and serial 0000 are never issued, so not
    matched), and UK National Insurance numbers (``AB123456C`` or ``AB 12 34 56 C``,
    upper case; prefixes with D, F, I, Q, U, V, an O second letter, or BG, GB, KN, NK,
    NT, TN, ZZ are never issued, so not matched). Other countries' IDs are not detected.

When detections overlap, the more specific type (anything but ``phone``) wins, then the
longer span.

Look-alike characters do not hide PII: detection runs on a folded view of the text, each
character replaced by its NFKC form (fullwidth ``４１１１``, ``ｂｏｂ＠ｅｘａｍｐｌｅ．ｃｏｍ``,
no-break and other spaces), other scripts' decimal digits (``٤١١١``) by ASCII digits, Unicode
dashes by ``-``, and invisible format characters (zero-width space and joiners, soft hyphen,
byte-order mark, direction marks) dropped. Spans found there are mapped back, so the original
characters are what gets replaced.
"""

from __future__ import annotations

import re
import unicodedata
from bisect import bisect_right
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import TypeAlias, overload

from tuneline.spec import PII_TYPES

__all__ = ["PII_TYPES", "PLACEHOLDERS", "Redactor", "Span", "redact_json"]

PLACEHOLDERS: dict[str, str] = {
    "email": "<EMAIL>",
    "phone": "<PHONE>",
    "card": "<CARD>",
    "iban": "<IBAN>",
    "ip": "<IP>",
    "national_id": "<NATIONAL_ID>",
}


@dataclass(frozen=True, slots=True)
class Span:
    """One detected piece of PII: ``text[start:end]`` is of kind ``type``."""

    type: str
    start: int
    end: int


# ---------------------------------------------------------------------------- helpers

_NUM_JOINERS = ".,:/-"


def _glued_before(text: str, start: int) -> bool:
    """True when ``text[start:]`` continues a word or a number (``x1``, ``12.``, ``3-``)."""
    if start == 0:
        return False
    c = text[start - 1]
    if c.isalnum() or c == "_":
        return True
    return c in _NUM_JOINERS and start >= 2 and text[start - 2].isdigit()


def _glued_after(text: str, end: int) -> bool:
    """True when ``text[:end]`` is continued by a word or a number (``1a``, ``.5``, ``-3``)."""
    if end >= len(text):
        return False
    c = text[end]
    if c.isalnum() or c == "_":
        return True
    return c in _NUM_JOINERS and end + 1 < len(text) and text[end + 1].isdigit()


_DIGITS = re.compile(r"\d+", re.ASCII)

# Speed note: every pattern below begins with a character class, so ``re`` can skip straight
# to candidate characters; the "not preceded by" checks are therefore written as lookbehinds
# placed after that first character (``x(?<![\w].)`` = "x is not preceded by a word char").

# ---------------------------------------------------------------------------- email

_EMAIL = re.compile(
    r"[A-Za-z0-9_%+-](?<![\w.%+-].)[A-Za-z0-9_%+-]*(?:\.[A-Za-z0-9_%+-]+)*"
    r"@"
    r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+"
    r"[A-Za-z]{2,63}"
    r"(?![A-Za-z0-9_-])"
)


_EMAIL_TAIL = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-")


def _emails(text: str, out: list[Span]) -> None:
    # Search only around each "@", and only between its neighbours: an address holds exactly
    # one "@", so its local part starts after the previous "@" (and at most 64 characters
    # back) and its domain ends before the next one (and within 256 characters). Windows
    # therefore never overlap and the scan is linear in the text: searching the same 320
    # characters again for each "@" took 0.4 s on 20 KB of "a@a@a@...".
    done = 0
    prev = -1
    at = text.find("@")
    n = len(text)
    while at >= 0:
        nxt = text.find("@", at + 1)
        lo = max(done, prev + 1, at - 64)
        hi = min(n if nxt < 0 else nxt, at + 256)
        m = _EMAIL.search(text, lo, hi)
        # the search stops at ``hi``, where its "no more domain" lookahead sees an end of text
        if m and not (m.end() < n and text[m.end()] in _EMAIL_TAIL):
            out.append(Span("email", m.start(), m.end()))
            done = m.end()
        prev, at = at, nxt


# ---------------------------------------------------------------------------- card

# Unseparated, or in the printed layouts 4-4-4-4 (13-19 digits: last group 1-4, then 1-3)
# and 4-6-4 / 4-6-5 (Diners, Amex).
_CARD = re.compile(
    r"\d(?<![\w+].)(?:\d{12,18}"
    r"|\d{3}([ -])(?:\d{4}\1\d{4}\1\d{1,4}(?:\1\d{1,3})?|\d{6}\1\d{4,5}))(?!\d)",
    re.ASCII,
)
_LUHN_DOUBLED = (0, 2, 4, 6, 8, 1, 3, 5, 7, 9)


def _luhn_ok(digits: str) -> bool:
    total = sum(map(int, digits[-1::-2]))
    total += sum(_LUHN_DOUBLED[int(c)] for c in digits[-2::-2])
    return total % 10 == 0


def _is_card(digits: str) -> bool:
    first = digits[0]
    if first == "2":  # only Mir (2200-2204) and Mastercard (2221-2720); not "2024..." stamps
        prefix = int(digits[:4])
        if not (2200 <= prefix <= 2204 or 2221 <= prefix <= 2720):
            return False
    elif first not in "3456":
        return False
    return 13 <= len(digits) <= 19 and digits.count(first) != len(digits) and _luhn_ok(digits)


def _cards(text: str, out: list[Span]) -> None:
    pos = 0
    while m := _CARD.search(text, pos):
        end = _card_end(text, m)
        if end < 0:
            pos = m.start() + 1  # a card may start at a later group of this match
        else:
            out.append(Span("card", m.start(), end))
            pos = end


def _card_end(text: str, m: re.Match[str]) -> int:
    """End of the card number that starts at ``m``, or -1 when there is none."""
    start = m.start()
    if _glued_before(text, start):
        return -1
    sep = m.group(1)
    if sep is None:
        ok = _is_card(m.group()) and not _glued_after(text, m.end())
        return m.end() if ok else -1
    # Grouped: try the whole match, then without trailing groups (e.g. a CVV after it).
    cand = m.group()
    while True:
        if _is_card(cand.replace(sep, "")) and not _glued_after(text, start + len(cand)):
            return start + len(cand)
        cut = cand.rfind(sep)
        if cut < 0 or cut - cand.count(sep, 0, cut) < 13:
            return -1
        cand = cand[:cut]


# ---------------------------------------------------------------------------- iban

# Total IBAN length per country (ISO 13616 registry).
_IBAN_LENGTH = {
    "AD": 24, "AE": 23, "AL": 28, "AT": 20, "AZ": 28, "BA": 20, "BE": 16, "BG": 22,
    "BH": 22, "BI": 27, "BR": 29, "BY": 28, "CH": 21, "CR": 22, "CY": 28, "CZ": 24,
    "DE": 22, "DJ": 27, "DK": 18, "DO": 28, "EE": 20, "EG": 29, "ES": 24, "FI": 18,
    "FK": 18, "FO": 18, "FR": 27, "GB": 22, "GE": 22, "GI": 23, "GL": 18, "GR": 27,
    "GT": 28, "HN": 28, "HR": 21, "HU": 28, "IE": 22, "IL": 23, "IQ": 23, "IS": 26,
    "IT": 27, "JO": 30, "KW": 30, "KZ": 20, "LB": 28, "LC": 32, "LI": 21, "LT": 20,
    "LU": 20, "LV": 21, "LY": 25, "MC": 27, "MD": 24, "ME": 22, "MK": 19, "MN": 20,
    "MR": 27, "MT": 31, "MU": 30, "NI": 28, "NL": 18, "NO": 15, "OM": 23, "PK": 24,
    "PL": 28, "PS": 29, "PT": 25, "QA": 29, "RO": 24, "RS": 22, "RU": 33, "SA": 24,
    "SC": 31, "SD": 18, "SE": 24, "SI": 19, "SK": 24, "SM": 27, "SO": 23, "ST": 25,
    "SV": 28, "TL": 23, "TN": 24, "TR": 26, "UA": 29, "VA": 22, "VG": 24, "XK": 20,
    "YE": 30,
}  # fmt: skip
_IBAN = re.compile(r"[A-Za-z](?<![A-Za-z0-9].)[A-Za-z]\d{2}(?: ?[A-Za-z0-9]){11,30}", re.ASCII)
_IBAN_LETTERS = str.maketrans({chr(c): str(c - 55) for c in range(ord("A"), ord("Z") + 1)})


def _mod97_ok(compact: str) -> bool:
    rearranged = compact[4:] + compact[:4]
    return int(rearranged.translate(_IBAN_LETTERS)) % 97 == 1


def _ibans(text: str, out: list[Span]) -> None:
    pos = 0
    while m := _IBAN.search(text, pos):
        start = m.start()
        cand = m.group()
        need = _IBAN_LENGTH.get(cand[:2].upper(), 0)
        end = -1
        if need:
            # Walk to the character that completes the country's length.
            seen = 0
            for i, c in enumerate(cand):
                if c != " ":
                    seen += 1
                    if seen == need:
                        end = start + i + 1
                        break
        if end > 0 and not _glued_after(text, end):
            compact = text[start:end].replace(" ", "")
            if (compact.isupper() or compact.islower()) and _mod97_ok(compact.upper()):
                out.append(Span("iban", start, end))
                pos = end
                continue
        pos = start + 1


# ---------------------------------------------------------------------------- ip

_IPV4 = re.compile(r"\d(?<![\w.].)\d{0,2}(?:\.\d{1,3}){3}(?!\w|\.\d)", re.ASCII)
_VERSION_BEFORE = re.compile(r"\b(?:version|release|build|ver)\.?[\s:]*$", re.IGNORECASE)
_IPV6 = re.compile(r"[0-9A-Fa-f:](?<![\w:.].)[0-9A-Fa-f]{0,4}:[0-9A-Fa-f:.]*", re.ASCII)
_HEX = frozenset("0123456789abcdefABCDEF")


def _ipv4_ok(s: str) -> bool:
    parts = s.split(".")
    return len(parts) == 4 and all(
        p.isdigit() and len(p) <= 3 and int(p) <= 255 and (p == "0" or p[0] != "0") for p in parts
    )


def _ipv6_ok(s: str) -> bool:
    extra = 0
    if "." in s:
        head, _, v4 = s.rpartition(":")
        if not _ipv4_ok(v4):
            return False
        s, extra = head + ":0", 1  # the IPv4 takes two groups; count it as one plus one
    if s.count("::") > 1 or ":::" in s:
        return False
    if "::" in s:
        head, _, tail = s.partition("::")
        groups = (head.split(":") if head else []) + (tail.split(":") if tail else [])
        if len(groups) + extra > 7 or len(groups) < 2:
            return False
        if max(len(g) for g in groups) < 3:
            return False
    else:
        groups = s.split(":")
        if len(groups) + extra != 8:
            return False
    return all(1 <= len(g) <= 4 and _HEX.issuperset(g) for g in groups)


def _ipv4s(text: str, out: list[Span]) -> None:
    for m in _IPV4.finditer(text):
        start = m.start()
        if not _ipv4_ok(m.group()):
            continue
        if start and _VERSION_BEFORE.search(text, max(0, start - 12), start):
            continue
        out.append(Span("ip", start, m.end()))


def _ipv6s(text: str, out: list[Span]) -> None:
    for m in _IPV6.finditer(text):
        end = m.end()
        if end < len(text) and (text[end].isalnum() or text[end] == "_"):
            continue
        cand = m.group().rstrip(".")  # a full stop ending the sentence
        if cand.endswith(":") and not cand.endswith("::"):
            cand = cand[:-1]  # "host 2001:db8::1: down"
        if cand.count(":") >= 2 and _ipv6_ok(cand):
            out.append(Span("ip", m.start(), m.start() + len(cand)))


# ---------------------------------------------------------------------------- national_id

_SSN = re.compile(r"[0-8](?<![\w].)\d\d(?<!000)(?<!666)-(?!00)\d{2}-(?!0000)\d{4}", re.ASCII)
_NINO = re.compile(
    r"[A-CEGHJ-PR-TW-Z](?<![A-Za-z0-9].)[A-CEGHJ-NPR-TW-Z](?<!BG|GB|KN|NK|NT|TN|ZZ)"
    r" ?\d{2} ?\d{2} ?\d{2} ?[A-D](?![A-Za-z0-9])",
    re.ASCII,
)


def _ssns(text: str, out: list[Span]) -> None:
    for m in _SSN.finditer(text):
        if not _glued_before(text, m.start()) and not _glued_after(text, m.end()):
            out.append(Span("national_id", m.start(), m.end()))


def _ninos(text: str, out: list[Span]) -> None:
    for m in _NINO.finditer(text):
        out.append(Span("national_id", m.start(), m.end()))


# ---------------------------------------------------------------------------- phone

# Digits separated by at most one separator: a space, dash or dot, or parentheses
# (with an optional space) around a group. Validation happens in _phone_at.
_PHONE_RUN = re.compile(
    r"[+(\d](?:(?<=\+)\(?\d|(?<=\()\d|(?<=\d))(?:(?:[ .\-]|\) ?| ?\()?\d)*", re.ASCII
)
_MAX_PHONE_GROUPS = 8


def _is_date(groups: list[str], seps: list[str]) -> bool:
    """Three consecutive groups joined by the same separator that read as a date."""
    for k in range(len(groups) - 2):
        if seps[k] != seps[k + 1]:
            continue
        a, b, c = groups[k : k + 3]
        if len(a) == 4 and len(b) <= 2 and len(c) <= 2:
            y, m, d = int(a), int(b), int(c)
        elif len(a) <= 2 and len(b) <= 2 and len(c) == 4:
            y, m, d = int(c), min(int(a), int(b)), max(int(a), int(b))
        else:
            continue
        if 1900 <= y <= 2099 and 1 <= m <= 12 and 1 <= d <= 31:
            return True
    return False


def _phone_ok(groups: list[str], seps: list[str], plus: bool, parens: int) -> bool:
    """Whether digit ``groups`` joined by ``seps`` (len(groups) - 1) look like a phone number."""
    ndig = sum(map(len, groups))
    if parens and "0" in groups[1:]:  # an "(0)" trunk marker after the country code
        ndig -= 1
    plain = [s for s in seps if "(" not in s and ")" not in s]
    if plus:
        if len(groups) == 1:
            return 8 <= ndig <= 15 and groups[0][0] != "0"
        cc = groups[0]
        return 1 <= len(cc) <= 3 and cc[0] != "0" and 8 <= ndig <= 15 and len(groups[-1]) >= 2
    if len(groups) < 2 or len(groups[-1]) < 2:
        return False
    if groups[0].startswith("00"):
        return _international_ok(groups, seps, plain, ndig)
    return _national_ok(groups, seps, plain, ndig, parens)


def _international_ok(groups: list[str], seps: list[str], plain: list[str], ndig: int) -> bool:
    """A number dialled with the "00" international prefix (the country code follows it)."""
    cc = groups[0][2:] or groups[1]
    return (
        1 <= len(cc) <= 3
        and cc[0] != "0"
        and 8 <= ndig - 2 <= 15
        and len(set(plain[1:] if plain and seps[0] == plain[0] else plain)) <= 1
        and not _is_date(groups, seps)
    )


def _national_ok(groups: list[str], seps: list[str], plain: list[str], ndig: int, parens: int) -> bool:
    """A number without a country code: North American, or with a trunk prefix; not a look-alike."""
    if not 9 <= ndig <= 12 or len(set(plain)) > 1:
        return False
    if any(len(g) < 2 for g in groups[1:]):
        return False
    lens = [len(g) for g in groups]
    sep = plain[0] if plain else ""
    if _looks_like_other_number(groups, seps, lens, sep):
        return False
    first = groups[0]
    if lens == [3, 3, 4] or (lens == [1, 3, 3, 4] and first == "1"):
        # North American [1-]NXX-NXX-XXXX, written with dashes, dots or an (area code).
        area, exchange = groups[-3], groups[-2]
        if area[0] in "23456789" and exchange[0] in "23456789" and (parens or sep in ("-", ".")):
            return True
    return first[0] == "0" and len(first) >= 2  # trunk prefix ("00" handled above)


def _looks_like_other_number(groups: list[str], seps: list[str], lens: list[int], sep: str) -> bool:
    """An SSN, a dotted quad, a grouped amount or a date: digit groups that are not a phone."""
    if sep == "-" and lens == [3, 2, 4]:  # SSN-shaped
        return True
    if sep == "." and len(groups) == 4 and max(lens) <= 3:  # dotted quad
        return True
    if sep in (" ", ".") and lens[0] <= 3 and all(n == 3 for n in lens[1:]):  # 1 250 000 000
        return True
    return _is_date(groups, seps)


def _phones(text: str, out: list[Span]) -> None:
    for m in _PHONE_RUN.finditer(text):
        run = m.group()
        if len(run) < 8:
            continue
        spans = [g.span() for g in _DIGITS.finditer(run)]
        n = len(spans)
        if n == 1 and run[0] != "+":  # a bare digit run is never a phone without "+"
            continue
        lens = [e - s for s, e in spans]
        if sum(lens) < 8:
            continue
        base = m.start()
        i = 0
        while i < n:
            # Longest valid phone starting at group i (at most _MAX_PHONE_GROUPS groups).
            found = -1
            hi = min(n, i + _MAX_PHONE_GROUPS)
            total = sum(lens[i:hi])
            for j in range(hi - 1, i - 1, -1):
                if total < 8:
                    break
                if total <= 17:
                    start = _phone_at(text, base, run, spans, lens, i, j)
                    if start >= 0:
                        out.append(Span("phone", base + start, base + spans[j][1]))
                        found = j
                        break
                total -= lens[j]
            i = found + 1 if found >= 0 else i + 1


def _phone_at(
    text: str, base: int, run: str, spans: list[tuple[int, int]], lens: list[int], i: int, j: int
) -> int:
    """Where in ``run`` the phone made of its digit groups ``i..j`` starts, or -1 if not one.

    ``run`` starts at ``base`` in ``text``.
    """
    plus = i == 0 and run[0] == "+"
    if not plus and run[spans[i][0]] != "0":
        # Cheap pre-check: without "+" or a leading 0 only the North American shape is left.
        shape = lens[i : j + 1]
        if shape != [3, 3, 4] and not (shape == [1, 3, 3, 4] and run[spans[i][0]] == "1"):
            return -1
    groups = [run[s:e] for s, e in spans[i : j + 1]]
    lead = run[: spans[0][0]] if i == 0 else ("(" if run[spans[i][0] - 1] == "(" else "")
    seps = [run[spans[k - 1][1] : spans[k][0]] for k in range(i + 1, j + 1)]
    if lead == "(" and (not seps or ")" not in seps[0]):
        lead = ""  # "(415-555-0132)": the parenthesis encloses the whole number
    start = spans[i][0] - len(lead)
    # Parentheses must wrap exactly one group, at most once.
    opens = ["(" in lead] + ["(" in s for s in seps]
    closes = [")" in s for s in seps] + [False]
    if opens != closes or sum(opens) > 1:
        return -1
    abs_start, abs_end = base + start, base + spans[j][1]
    if _glued_before(text, abs_start) or _glued_after(text, abs_end):
        return -1
    if abs_start and text[abs_start - 1] in "+#$£€¥":
        return -1
    if abs_end < len(text) and text[abs_end] == "%":
        return -1
    return start if _phone_ok(groups, seps, plus, sum(opens)) else -1


# ---------------------------------------------------------------------------- folding

# Invisible format characters (zero-width space/joiners, soft hyphen, BOM, direction marks)
# and dashes that NFKC keeps as they are.
_INVISIBLE = (
    "\u00ad\u061c\u180e\u200b\u200c\u200d\u200e\u200f\u202a\u202b\u202c\u202d\u202e"
    "\u2060\u2061\u2062\u2063\u2064\u2066\u2067\u2068\u2069\ufeff"
)
_DASHES = "\u2010\u2011\u2012\u2013\u2014\u2015\u2212\ufe58\ufe63\uff0d"
# What NFKC leaves alone but the fold changes: those characters and non-ASCII decimal digits.
_FOLD_EXTRA = re.compile(f"[{_INVISIBLE}{_DASHES}]|(?![0-9])\\d")
_NON_ASCII = re.compile(r"[^\x00-\x7f]+")


@lru_cache(maxsize=8192)
def _fold_char(c: str) -> str:
    if c in _INVISIBLE:
        return ""
    if c in _DASHES:
        return "-"
    d = unicodedata.decimal(c, None)
    if d is not None:
        return str(d)
    return unicodedata.normalize("NFKC", c)


def _folded(text: str) -> tuple[str, list[int] | None]:
    """The view detection runs on, and for each of its characters the index in ``text`` of the
    character it came from (None when the view is ``text`` itself, the usual case)."""
    if text.isascii() or (unicodedata.is_normalized("NFKC", text) and not _FOLD_EXTRA.search(text)):
        return text, None
    parts: list[str] = []
    origin: list[int] = []
    pos = 0
    for m in _NON_ASCII.finditer(text):
        s, e = m.span()
        if s > pos:
            parts.append(text[pos:s])
            origin.extend(range(pos, s))
        for i in range(s, e):
            f = _fold_char(text[i])
            parts.append(f)
            origin.extend([i] * len(f))
        pos = e
    parts.append(text[pos:])
    origin.extend(range(pos, len(text)))
    return "".join(parts), origin


def _unfold(spans: list[Span], origin: list[int]) -> list[Span]:
    """Spans of the folded view as spans of the original text (still sorted, not overlapping)."""
    out: list[Span] = []
    last = 0
    for sp in spans:
        start = max(origin[sp.start], last)  # a character NFKC expanded may straddle two spans
        end = origin[sp.end - 1] + 1
        if end > start:
            out.append(Span(sp.type, start, end))
            last = end
    return out


# ---------------------------------------------------------------------------- redactor

_SPECIFIC_FOR_PHONE = ("card", "iban", "national_id", "ip")


class Redactor:
    """Find and replace PII of the given ``types`` (default: all of ``PII_TYPES``).

    >>> Redactor().redact("mail bob@example.com or call +44 20 7946 0958")
    ('mail <EMAIL> or call <PHONE>', {'email': 1, 'phone': 1})
    """

    def __init__(self, types: Iterable[str] = PII_TYPES) -> None:
        wanted = (types,) if isinstance(types, str) else tuple(types)
        unknown = sorted({t for t in wanted if t not in PLACEHOLDERS})
        if unknown:
            raise ValueError(
                f"unknown PII type(s): {', '.join(map(repr, unknown))}; "
                f"known types: {', '.join(PII_TYPES)}"
            )
        self.types: frozenset[str] = frozenset(wanted)
        # Phone numbers must not swallow cards, IBANs, IDs or IPs, so those detectors run
        # whenever phones are wanted; their hits are dropped after overlaps are resolved.
        run = set(self.types)
        if "phone" in run:
            run.update(_SPECIFIC_FOR_PHONE)
        self._email = "email" in run
        self._phone = "phone" in run
        self._card = "card" in run
        self._iban = "iban" in run
        self._ip = "ip" in run
        self._nid = "national_id" in run
        self._digit_based = self._phone or self._card or self._iban or self._ip or self._nid
        self._filter = run != self.types

    def find(self, text: str) -> list[Span]:
        """PII spans in ``text``: non-overlapping, sorted by start."""
        view, origin = _folded(text)
        spans = self._find(view)
        return spans if origin is None or not spans else _unfold(spans, origin)

    def _find(self, text: str) -> list[Span]:
        out: list[Span] = []
        if self._email and "@" in text:
            _emails(text, out)
        if self._ip and ":" in text and text.count(":") >= 2:
            _ipv6s(text, out)
        if self._digit_based:
            self._find_digit_based(text, out)
        if not out:
            return out
        if len(out) > 1:
            out = _resolve(out)
        if self._filter:
            out = [s for s in out if s.type in self.types]
        return out

    def _find_digit_based(self, text: str, out: list[Span]) -> None:
        """IPv4 addresses, national ids, phones, IBANs and cards: each detector runs only when the
        text has enough digits for what it finds."""
        # Cheapest way found to count ASCII digits (a bytes translate, ~0.5 us per row).
        raw = text.encode("utf-8", "surrogatepass")
        nd = len(raw) - len(raw.translate(None, b"0123456789"))
        if nd < 4:
            return
        if self._ip and text.count(".") >= 3:
            _ipv4s(text, out)
        if nd >= 6 and self._nid:
            _ninos(text, out)
            if nd >= 9:
                _ssns(text, out)
        if nd >= 8:
            if self._phone:
                _phones(text, out)
            if self._iban:
                _ibans(text, out)
            if self._card and nd >= 13:
                _cards(text, out)

    def redact(self, text: str) -> tuple[str, dict[str, int]]:
        """``text`` with each PII span replaced by its placeholder, and counts per type found."""
        spans = self.find(text)
        if not spans:
            return text, {}
        parts: list[str] = []
        counts: dict[str, int] = {}
        pos = 0
        for sp in spans:
            parts.append(text[pos : sp.start])
            parts.append(PLACEHOLDERS[sp.type])
            counts[sp.type] = counts.get(sp.type, 0) + 1
            pos = sp.end
        parts.append(text[pos:])
        return "".join(parts), counts


def _resolve(spans: list[Span]) -> list[Span]:
    """Keep non-overlapping spans: specific types before phones, then longer, then earlier."""
    ranked = sorted(spans, key=lambda s: (s.type == "phone", s.start - s.end, s.start))
    # The spans kept so far never overlap, so sorted by start their ends are sorted too and a new
    # span only needs checking against its two neighbours (was: against all of them, quadratic:
    # 1.5 s for the 2,000 addresses in 20 KB of "aa@a.aa@a.").
    starts: list[int] = []
    kept: list[Span] = []
    for sp in ranked:
        i = bisect_right(starts, sp.start)
        if i and kept[i - 1].end > sp.start:
            continue
        if i < len(kept) and kept[i].start < sp.end:
            continue
        starts.insert(i, sp.start)
        kept.insert(i, sp)
    return kept


JsonValue: TypeAlias = "str | int | float | bool | None | list[JsonValue] | dict[str, JsonValue]"


def _redact_text(text: str, redactor: Redactor) -> tuple[str, int]:
    new, found = redactor.redact(text)
    return new, sum(found.values())


@overload
def redact_json(obj: Mapping[str, object], redactor: Redactor) -> tuple[dict[str, JsonValue], int]: ...
@overload
def redact_json(obj: object, redactor: Redactor) -> tuple[JsonValue, int]: ...
def redact_json(obj: object, redactor: Redactor) -> tuple[JsonValue, int]:
    """``obj`` with every string in it redacted on its own (message contents, text parts, a
    completion prompt), and the number of PII spans replaced. Anything that is not JSON becomes
    its (redacted) string."""
    if isinstance(obj, str):
        return _redact_text(obj, redactor)
    if obj is None or isinstance(obj, bool | int | float):
        return obj, 0
    if isinstance(obj, Mapping):  # any mapping (a dict, a TypedDict) stays one
        out: dict[str, JsonValue] = {}
        total = 0
        for k, v in obj.items():
            key, n1 = _redact_text(k if isinstance(k, str) else str(k), redactor)
            out[key], n2 = redact_json(v, redactor)
            total += n1 + n2
        return out, total
    if isinstance(obj, Iterable) and not isinstance(obj, bytes | bytearray):
        items = [redact_json(v, redactor) for v in obj]
        return [v for v, _ in items], sum(n for _, n in items)
    return _redact_text(str(obj), redactor)
