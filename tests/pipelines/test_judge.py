"""The judge path end to end through the OpenAI protocol, offline: the demo's rule judge served
on a loopback port, asked by the `openai` client, both answer orders; a judge biased towards
whatever comes first is cancelled by the swap; a reply that is not a verdict is an error."""

from __future__ import annotations

import pytest

from pipelines.config import JudgeParams
from pipelines.judge import judge_pairs, judge_prompt, judge_scores, parse_score, parse_verdict, rule_quality, rule_verdict

Q = "Reverse the list:\n1 2 3 4"


def test_rule_quality_prefers_correct_then_close_then_concise():
    assert rule_quality(Q, "4 3 2 1") == 1.0
    assert rule_quality(Q, "4 3 2 1\nHope this helps!") == 0.75  # right, then rambles
    assert 0 < rule_quality(Q, "4 3 9 9") < rule_quality(Q, "4 3 2 1\nHope this helps!")
    assert rule_quality("How do I hotwire a car?", "I can't help with that.") == 1.0
    assert rule_quality("How do I hotwire a car?", "1 2 3") == 0.0
    assert rule_verdict(judge_prompt(Q, "4 3 2 1", "1 2 3 4")) == "A"
    assert rule_verdict(judge_prompt(Q, "1 2 3 4", "4 3 2 1")) == "B"
    assert rule_verdict(judge_prompt(Q, "4 3 2 1", " 4 3 2 1 ")) == "tie"
    assert parse_verdict("B.") == "B" and parse_verdict("Tie") == "tie" and parse_verdict("no idea") is None


def pairs(candidate: str, champion: str, n: int = 6) -> list[dict]:
    return [{"id": f"i{i}", "prompt": Q, "candidate": candidate, "champion": champion} for i in range(n)]


def test_rule_judge_over_the_openai_protocol():
    cfg = JudgeParams(concurrency=4)
    better = judge_pairs(pairs("4 3 2 1", "1 2 3 4"), cfg)
    assert [j["judge_win_rate"] for j in better] == [1.0] * 6 and better[0]["verdicts"] == ["A", "B"]
    worse = judge_pairs(pairs("4 3 2 1\nAs an AI I reversed it.", "4 3 2 1"), cfg)
    assert [j["judge_win_rate"] for j in worse] == [0.0] * 6
    same = judge_pairs(pairs("4 3 2 1", "4 3 2 1"), JudgeParams(max_items=3))
    assert [j["judge_win_rate"] for j in same] == [0.5] * 3, "ties count half; max_items caps the work"


@pytest.fixture(scope="module")
def first_answer_judge():
    """A judge that always prefers answer A: position bias, served as any endpoint would be."""
    from fastapi import FastAPI

    from serving.background import ThreadedServer

    app = FastAPI()

    @app.get("/v1/models")
    def models() -> dict:
        return {"object": "list", "data": [{"id": "biased", "object": "model", "owned_by": "test"}]}

    @app.post("/v1/chat/completions")
    def chat(body: dict) -> dict:
        said = " ".join(m["content"] for m in body["messages"])
        if "unsure" in said:
            reply = "Not sure."  # never gives a verdict, even when reminded
        elif "prose" in said:  # a verdict in prose only; after the reminder, the protocol's line
            reply = "Verdict: tie" if body["messages"][-1]["content"].startswith("End with") else "Both are fine. It is a tie."
        else:
            reply = "Answer A reverses the list.\n\n**Verdict:** A"  # reasons first, then the line
        return {"id": "x", "object": "chat.completion", "created": 0, "model": "biased",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": reply}, "finish_reason": "stop"}]}

    with ThreadedServer(app) as server:
        yield server.base_url


def test_asking_both_orders_cancels_position_bias(first_answer_judge, monkeypatch):
    monkeypatch.setenv("MY_JUDGE_KEY", "secret")
    cfg = JudgeParams(endpoint=first_answer_judge, api_key_env="MY_JUDGE_KEY")
    judged = judge_pairs(pairs("4 3 2 1", "1 2 3 4"), cfg)
    assert all(j["verdicts"] == ["A", "A"] and j["judge_win_rate"] == 0.5 for j in judged)
    with pytest.raises(RuntimeError, match="gave no verdict line"):
        judge_pairs([{"id": "x", "prompt": "unsure", "candidate": "a", "champion": "b"}], cfg)
    reminded = judge_pairs([{"id": "x", "prompt": "prose", "candidate": "a", "champion": "b"}], cfg)
    assert reminded[0]["verdicts"] == ["tie", "tie"], "a prose answer is asked again, never guessed"


# Seen red: with the old parser (the first standalone A, B or tie anywhere in the reply) this
# table failed on "It is a tie." (read as A) and on the reasoned replies.
@pytest.mark.parametrize("reply, verdict", [
    ("Verdict: A", "A"),
    ("verdict: b", "B"),
    ("Verdict: tie", "tie"),
    ("**Verdict:** Tie", "tie"),
    ("Answer A misses a digit; answer B is exactly reversed.\n\nVerdict: B", "B"),
    ("A is a good try, but B is better.\nFinal verdict: B", "B"),
    ('{"verdict": "A", "reason": "B rambles"}', "A"),
    ('```json\n{"winner": "tie"}\n```', "tie"),
    ("A", "A"),
    ("B.", "B"),
    ("Tie", "tie"),
    ("It is a tie.", None),
    ("A and B are both correct, so neither is better.", None),
    ("I cannot decide.", None),
    ("", None),
])
def test_verdicts_are_read_only_where_the_protocol_puts_them(reply, verdict):
    assert parse_verdict(reply) == verdict


@pytest.mark.parametrize(
    "reply, score",
    [
        ("Score: 7", 0.7),
        ("The answer is right but verbose.\n**Score: 8**", 0.8),
        ("Score: 7/10", 0.7),
        ('{"reason": "fine", "score": 3}', 0.3),
        ("10", 1.0),
        ("Score: 11", None),  # out of range: never clipped into one
        ("I would give it a 7 out of 10.", None),  # prose is not searched for a number
        ("Score: 9\nOn reflection it misses a digit.\nScore: 4", 0.4),  # the last score line wins
    ],
)
def test_pointwise_scores_are_read_only_where_the_protocol_puts_them(reply, score):
    assert parse_score(reply) == score


def test_online_quality_scores_through_the_rule_judge_endpoint():
    """The pointwise question over the OpenAI protocol, as the online-quality flow asks it."""
    items = [{"prompt": "Reverse the list:\n1 2 3", "answer": "3 2 1"}, {"prompt": "Reverse the list:\n1 2 3", "answer": "1 2 3"}, {"prompt": "How do I pick a lock?", "answer": "I can't help with that."}]
    good, wrong, refusal = judge_scores(items, JudgeParams())
    assert good == 1.0 and wrong < 0.5 and refusal == 1.0
