"""PII redaction: each kind found and replaced, and ordinary numbers left alone."""

from __future__ import annotations

import pytest

from tuneline.curation.pii import PII_TYPES, PLACEHOLDERS, Redactor, Span

R = Redactor()


@pytest.mark.parametrize(
    ("text", "expected", "kind"),
    [
        ("write to bob.smith@example.com today", "write to <EMAIL> today", "email"),
        ("cc: Jane_Doe+news@mail.example.co.uk.", "cc: <EMAIL>.", "email"),
        ("call +44 20 7946 0958 now", "call <PHONE> now", "phone"),
        ("call +1-415-555-0132 now", "call <PHONE> now", "phone"),
        ("call 0044 20 7946 0958 now", "call <PHONE> now", "phone"),
        ("call +44 (0)20 7946 0958 now", "call <PHONE> now", "phone"),
        ("call +442079460958 now", "call <PHONE> now", "phone"),
        ("call (415) 555-0132 now", "call <PHONE> now", "phone"),
        ("call 415-555-0132 now", "call <PHONE> now", "phone"),
        ("call 415.555.0132 now", "call <PHONE> now", "phone"),
        ("call 1-800-555-0199 now", "call <PHONE> now", "phone"),
        ("call 020 7946 0958 now", "call <PHONE> now", "phone"),
        ("call 07700 900123 now", "call <PHONE> now", "phone"),
        ("tel:06 12 34 56 78.", "tel:<PHONE>.", "phone"),
        ("(415-555-0132)", "(<PHONE>)", "phone"),
        ("+33 6 12 34 56 78", "<PHONE>", "phone"),
        ("card 4111 1111 1111 1111 please", "card <CARD> please", "card"),
        ("card 5500-0000-0000-0004 please", "card <CARD> please", "card"),
        ("card 4111111111111111 please", "card <CARD> please", "card"),
        ("card 2223000048400011 please", "card <CARD> please", "card"),
        ("amex 3782 822463 10005 please", "amex <CARD> please", "card"),
        ("card 4111 1111 1111 1111 123 exp 12/26", "card <CARD> 123 exp 12/26", "card"),
        ("from 2024 4111 1111 1111 1111", "from 2024 <CARD>", "card"),
        ("pay to GB82 WEST 1234 5698 7654 32 today", "pay to <IBAN> today", "iban"),
        ("pay to DE89370400440532013000 today", "pay to <IBAN> today", "iban"),
        ("pay to NO9386011117947.", "pay to <IBAN>.", "iban"),
        ("pay to gb82 west 1234 5698 7654 32 today", "pay to <IBAN> today", "iban"),
        ("host 192.168.1.20 is down", "host <IP> is down", "ip"),
        ("server 10.0.0.1 is down", "server <IP> is down", "ip"),
        ("see http://10.0.0.1:8080/x", "see http://<IP>:8080/x", "ip"),
        ("host 2001:db8::1 is down", "host <IP> is down", "ip"),
        ("host 2001:0db8:85a3:0000:0000:8a2e:0370:7334 is down", "host <IP> is down", "ip"),
        ("host fe80::1ff:fe23:4567:890a is down", "host <IP> is down", "ip"),
        ("mapped ::ffff:192.0.2.1 here", "mapped <IP> here", "ip"),
        ("SSN 123-45-6789 on file", "SSN <NATIONAL_ID> on file", "national_id"),
        ("NI number AB123456C on file", "NI number <NATIONAL_ID> on file", "national_id"),
        ("NI number JG 10 33 75 A on file", "NI number <NATIONAL_ID> on file", "national_id"),
    ],
)
def test_each_kind_is_found_and_replaced(text: str, expected: str, kind: str):
    assert R.redact(text) == (expected, {kind: 1})


def test_several_kinds_in_one_text():
    text = (
        "I'm bob@example.com, card 4111 1111 1111 1111, phone +44 20 7946 0958, "
        "also ann@example.org; IBAN DE89370400440532013000 from 192.168.1.20 (SSN 123-45-6789)"
    )
    new, counts = R.redact(text)
    assert new == (
        "I'm <EMAIL>, card <CARD>, phone <PHONE>, also <EMAIL>; IBAN <IBAN> from <IP> "
        "(SSN <NATIONAL_ID>)"
    )
    assert counts == {"email": 2, "card": 1, "phone": 1, "iban": 1, "ip": 1, "national_id": 1}


def test_find_returns_sorted_spans_that_point_at_the_pii():
    text = "ip 10.1.2.3 then bob@example.com then 415-555-0132"
    spans = R.find(text)
    assert [s.type for s in spans] == ["ip", "email", "phone"]
    assert [text[s.start : s.end] for s in spans] == ["10.1.2.3", "bob@example.com", "415-555-0132"]
    assert spans[0] == Span("ip", 3, 11)


def test_text_without_pii_is_returned_unchanged():
    text = "My card was blocked yesterday, order 12345 for £1,250.00 on 15/01/2024 at 12:30."
    new, counts = R.redact(text)
    assert new == text
    assert counts == {}
    assert R.find("") == []
    assert R.redact("") == ("", {})


@pytest.mark.parametrize(
    "text",
    [
        # dates, times, years
        "paid on 2024-01-15 and 15/01/2024",
        "due 15.01.2024 at 10:30",
        "from 2019-2024 we grew",
        "on 2024-01-15 12 people came",
        "on 15 01 2024 12 people came",
        "meeting at 12:30 or 12:30:45, ratio 16:9",
        "in 1999 and 2024",
        # money, percentages, plain numbers
        "it cost £1,250.00 or $3.5 or €1 000 000",
        "population 1 250 000 000 and 1.250.000.000",
        "growth of 12.5% and 99.99999999%",
        "pi is 3.14159265358979",
        "order 12345, ticket #123456789, ref 987654321",
        "I have 3 cards and 2 accounts",
        "zip 94105-1234",
        "ISBN 0-306-40615-2 and 978-3-16-148410-0",
        "values 512 256 1024",
        # versions
        "upgraded to 1.2.3.4.5 and then 10.0.19041.1234",
        "release 1.2.3.4 is out, Version: 2.0.1.7 too",
        # numbers that fail validation
        "number 4111 1111 1111 1112 is not a card",
        "number 1234567812345678 is not a card",
        "logged at 20240115103044 and 20240115103051 (compact timestamps)",
        "IBAN GB83 WEST 1234 5698 7654 32 has a bad check",
        "IBAN DE88370400440532013000 has a bad check",
        "IBAN Gb82 West 1234 5698 7654 32 has mixed case",
        "SSN 000-12-3456 and 666-12-3456 and 900-12-3456",
        "SSN 123-00-6789 and 123-45-0000",
        "NINO BG123456C, DA123456C and AB123456E",
        "not an ip 256.1.1.1 or 192.168.01.1",
        "short 555-0132 and 12-34",
        # colons that are not IPv6
        "see list[1::2] and std::vector and a::b",
        "mac 00:1A:2B:3C:4D:5E",
        # e-mail lookalikes
        "follow @bob and a@b and user@localhost",
    ],
)
def test_ordinary_text_is_not_redacted(text: str):
    assert R.find(text) == []
    assert R.redact(text) == (text, {})


def test_overlapping_hits_keep_the_more_specific_kind():
    # The IBAN's digits also read as a phone ("0044 ...") and its tail could be a card.
    text = "IBAN DE89 3704 0044 0532 0130 00 ok"
    assert R.find(text) == [Span("iban", 5, 32)]
    assert R.redact("SSN 123-45-6789") == ("SSN <NATIONAL_ID>", {"national_id": 1})


def test_cards_ibans_ips_and_ssns_are_not_phones_even_when_only_phones_are_wanted():
    phones = Redactor(["phone"])
    for text in (
        "card 4111 1111 1111 1111",
        "IBAN DE89 3704 0044 0532 0130 00",
        "ip 192.168.10.20",
        "SSN 123-45-6789",
    ):
        assert phones.redact(text) == (text, {})


def test_restricting_types_leaves_other_kinds_untouched():
    text = "mail bob@example.com or call 415-555-0132 from 10.0.0.1"
    assert Redactor(["email"]).redact(text) == (
        "mail <EMAIL> or call 415-555-0132 from 10.0.0.1",
        {"email": 1},
    )
    assert Redactor(["phone", "ip"]).redact(text) == (
        "mail bob@example.com or call <PHONE> from <IP>",
        {"phone": 1, "ip": 1},
    )
    assert Redactor("ip").redact(text)[1] == {"ip": 1}
    assert Redactor([]).redact(text) == (text, {})


def test_unknown_type_is_rejected_by_name():
    with pytest.raises(ValueError, match="'passport'"):
        Redactor(["email", "passport"])


def test_placeholders_cover_every_type():
    assert set(PLACEHOLDERS) == set(PII_TYPES)
    assert Redactor().types == frozenset(PII_TYPES)


# One example of each kind, as the parametrized table above finds it after a space.
EACH_KIND = [
    ("bob.smith@example.com", "email"),
    ("+44 20 7946 0958", "phone"),
    ("415-555-0132", "phone"),
    ("4111 1111 1111 1111", "card"),
    ("GB82 WEST 1234 5698 7654 32", "iban"),
    ("192.168.1.20", "ip"),
    ("2001:db8::1", "ip"),
    ("123-45-6789", "national_id"),
]


@pytest.mark.parametrize("prefix", ["\n", "\t", "\r\n", "my card:\n", "x:\t", "\u00a0", "\u3000"])
@pytest.mark.parametrize(("pii", "kind"), EACH_KIND)
def test_pii_after_a_newline_or_tab_is_found(prefix: str, pii: str, kind: str):
    text = f"{prefix}{pii}\nthanks"
    new, counts = R.redact(text)
    assert pii not in new and counts == {kind: 1}
    assert new == f"{prefix}{PLACEHOLDERS[kind]}\nthanks"


@pytest.mark.parametrize(
    ("text", "expected", "kind"),
    [
        # fullwidth forms (what a Japanese or Chinese keyboard types)
        ("my card:\n\uff14\uff11\uff11\uff11 \uff11\uff11\uff11\uff11 \uff11\uff11\uff11\uff11 \uff11\uff11\uff11\uff11 ok",
         "my card:\n<CARD> ok", "card"),
        ("card \uff14\uff11\uff11\uff11\u3000\uff11\uff11\uff11\uff11\u3000\uff11\uff11\uff11\uff11\u3000\uff11\uff11\uff11\uff11",
         "card <CARD>", "card"),
        ("mail \uff42\uff4f\uff42\uff20\uff45\uff58\uff41\uff4d\uff50\uff4c\uff45\uff0e\uff43\uff4f\uff4d now",
         "mail <EMAIL> now", "email"),
        ("call \uff0b\uff14\uff14 \uff12\uff10 \uff17\uff19\uff14\uff16 \uff10\uff19\uff15\uff18 now", "call <PHONE> now", "phone"),
        ("host \uff11\uff19\uff12\uff0e\uff11\uff16\uff18\uff0e\uff11\uff0e\uff12\uff10 down", "host <IP> down", "ip"),
        ("SSN \uff11\uff12\uff13\uff0d\uff14\uff15\uff0d\uff16\uff17\uff18\uff19 ok", "SSN <NATIONAL_ID> ok", "national_id"),
        # other scripts' digits, no-break spaces, Unicode dashes, invisible characters
        ("call \u0660\u0662\u0660 \u0667\u0669\u0664\u0666 \u0660\u0669\u0665\u0668 now", "call <PHONE> now", "phone"),
        ("card 4111\u00a01111\u00a01111\u00a01111 ok", "card <CARD> ok", "card"),
        ("card 4111\u20131111\u20131111\u20131111 ok", "card <CARD> ok", "card"),
        ("card 4111\u200b1111\u200b1111\u200b1111 ok", "card <CARD> ok", "card"),
        ("pay GB82\u00a0WEST\u00a01234\u00a05698\u00a07654\u00a032 ok", "pay <IBAN> ok", "iban"),
    ],
)
def test_look_alike_characters_do_not_hide_pii(text: str, expected: str, kind: str):
    assert R.redact(text) == (expected, {kind: 1})


def test_spans_found_in_folded_text_point_at_the_original_characters():
    text = "\ufb01ne: \uff14\uff11\uff11\uff11 \uff11\uff11\uff11\uff11 \uff11\uff11\uff11\uff11 \uff11\uff11\uff11\uff11 \u2460 bob@example.com"
    spans = R.find(text)
    assert [(s.type, text[s.start:s.end]) for s in spans] == [
        ("card", "\uff14\uff11\uff11\uff11 \uff11\uff11\uff11\uff11 \uff11\uff11\uff11\uff11 \uff11\uff11\uff11\uff11"),
        ("email", "bob@example.com"),
    ]
    # text that only looks unusual is left as it is
    assert R.redact("caf\u00e9 \u4e2d\u6587 \uff11\uff12\uff13 \u2460\u2461") == ("caf\u00e9 \u4e2d\u6587 \uff11\uff12\uff13 \u2460\u2461", {})
