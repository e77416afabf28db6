"""The toy world (`lightning_caopd.tasks.toy`): seeded items and their verifier."""

from lightning_caopd.tasks import toy


def test_toy_items_are_seeded_and_verified():
    a, b = toy.make_items(30, seed=3, split="eval"), toy.make_items(30, seed=3, split="eval")
    assert a == b and a != toy.make_items(30, seed=4, split="eval")
    assert {it["category"] for it in a} == set(toy.FAMILIES)
    for it in a:
        assert toy.verify(f"{it['demo']}\nConfidence: 0.5", it["answer"])
        assert not toy.verify("Answer: ?\nConfidence: 0.5", it["answer"])
    train_codes = {
        it["messages"][0]["content"]
        for it in toy.make_items(3000, 0, "train")
        if it["category"] == "code"
    }
    eval_codes = {it["messages"][0]["content"] for it in a if it["category"] == "code"}
    assert not train_codes & eval_codes
