"""Cleaning functions: PII (cards only when the Luhn check passes), near duplicates by
MinHash LSH, decontamination by n-grams with case and punctuation folded, repetition."""

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
