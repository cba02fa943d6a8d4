"""Cleaning functions: PII (cards only when the Luhn check passes, phones by libphonenumber,
IPv6, national IDs), near duplicates by MinHash LSH, decontamination by n-grams with case and
punctuation folded and boilerplate set aside, repetition."""

from pipelines.clean import Contamination, NearDuplicates, clean_text, find_pii, has_undecodable, luhn, normal_form, redact, repetition_ratio


def test_text_is_normalised_and_control_characters_go():
    assert clean_text("  Cafe\u0301\x00 \t ok \n\n  next  ") == "Café ok\nnext"
    assert normal_form("Reverse THE list: 1, 2!") == "reverse the list 1 2"
    assert has_undecodable(b"a\xffb".decode("utf-8", errors="surrogateescape")) and not has_undecodable("ab")


def test_pii_finds_what_it_claims_and_no_more():
    text = "mail jane.doe@example.com, call +1 415-555-0132, host 10.0.0.12, key sk-abcdefghijklmnopqrstuvwx, card 4111 1111 1111 1111"
    kinds = sorted(k for k, _ in find_pii(text))
    assert kinds == ["api_key", "card", "email", "ip", "phone"]
    assert luhn("4111111111111111") and not luhn("4111111111111112")
    assert find_pii("order 4111 1111 1111 1112 shipped") == [], "16 digits failing Luhn are not a card"
    assert find_pii("Reverse the list:\n1 2 3 4 5") == [], "the demo's digit lists are not phone numbers"
    assert redact("write to jane.doe@example.com") == "write to <EMAIL>"
    assert find_pii("AKIAABCDEFGHIJKLMNOP and ghp_" + "a" * 36)


def test_near_duplicates_are_caught_and_distinct_texts_kept():
    near = NearDuplicates(threshold=0.7, min_words=16)
    base = ("The quick brown fox jumps over the lazy dog while the farmer watches from the old wooden porch at dawn, "
            "and later that morning the children walk down the long gravel road to the small village school by the river")
    assert not near.seen(base)
    assert near.seen(base.replace("old", "ancient")), "one word changed is a near duplicate"
    assert not near.seen("An entirely different sentence about compilers, caches and the cost of branch mispredictions on modern cores")
    assert not near.seen("Reverse the list: 1 2 3"), "short texts are left to exact dedup"


def test_decontamination_sees_through_case_and_punctuation():
    index = Contamination(n=10)
    index.add("What is the capital city of France, the country in western Europe?", "Paris.")
    assert index.hit("what is the capital city of france the country in western europe", "Paris") is not None
    assert "10-gram" in index.hit("Quiz: what is the capital city of France, the country in western Europe today? Answer", "Paris")
    assert index.hit("What is the capital of Spain?", "Madrid") is None


def test_repetition_flags_loops_not_short_lists():
    assert repetition_ratio("again and again " * 20) > 0.5
    assert repetition_ratio("1 1 1 1 1 1 1 1") == 0.0
    assert repetition_ratio("A normal sentence with enough different words to be judged fairly by the filter here today, thanks.") == 0.0


def test_pii_covers_phones_without_separators_ipv6_and_national_ids_but_not_digit_lists():
    """Seen red: main's find_pii (a phone regex, no ipv6/ssn/nino) -> every one of these missed
    but '+1-202-555-0143'."""
    found = {text: [k for k, _ in find_pii(text)] for text in [
        "call +44 20 7946 0958 today", "ring +1-202-555-0143", "or 2025550143", "london 020 7946 0958",
        "host 2001:db8:85a3::8a2e:370:7334", "SSN 123-45-6789", "NI number AB 12 34 56 C",
    ]}
    assert found == {
        "call +44 20 7946 0958 today": ["phone"], "ring +1-202-555-0143": ["phone"], "or 2025550143": ["phone"], "london 020 7946 0958": ["phone"],
        "host 2001:db8:85a3::8a2e:370:7334": ["ipv6"], "SSN 123-45-6789": ["ssn"], "NI number AB 12 34 56 C": ["nino"],
    }
    for clean in ["reverse 3 1 4 1 5", "Reverse the list:\n1 2 3 4 5", "3 1 4 1 5 9 2 6 5 3", "at 12:30:45", "std::vector and a::b",
                  "000-12-3456", "ISBN 978-3-16-148410-0", "the years 1999-2025", "QQ123456C"]:
        assert find_pii(clean) == [], clean
    assert redact("SSN 123-45-6789, call 2025550143") == "SSN <SSN>, call <PHONE>"


def test_boilerplate_is_not_contamination_but_an_items_own_words_are():
    """A sign-off shared by many training rows and evaluation items proves nothing; a row that
    repeats an evaluation item's own sentence is still caught.
    Seen red: Contamination with common=10**9 (every shared n-gram is evidence) -> all 20
    sign-off rows "share the 10-gram 'if you have any other questions feel free to ask'"."""
    sign_off = "You're welcome! If you have any other questions, feel free to ask."
    index = Contamination(n=10, common=5)
    index.add("Thanks for booking the flight to Oslo on Friday.", sign_off, "test item 1")
    index.add("The Hubble telescope was launched in April 1990 aboard the shuttle Discovery, from Kennedy Space Center.", "Noted.", "test item 2")
    train = [(f"Thanks for the update on order {i}, much appreciated.", sign_off) for i in range(20)]
    train.append(("Fun fact: the Hubble telescope was launched in April 1990 aboard the shuttle Discovery!", "Neat."))
    for prompt, answer in train:
        index.count(prompt, [prompt], f"{prompt} {answer}")
    hits = [index.hit(p, a) for p, a in train]
    assert hits[:20] == [None] * 20, hits[:3]
    assert hits[20] and "test item 2" in hits[20] and "hubble telescope was launched" in hits[20]
