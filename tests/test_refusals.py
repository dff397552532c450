"""Refused ``stream_options`` (``proxy.refusals``): remembered per target, bounded, expiring."""

from __future__ import annotations

from proxy.refusals import MAX_TARGETS, TTL_SECONDS, Refusals, Target


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_target_is_its_provider_deployment_or_model_and_api_version() -> None:
    path = "/openai/deployments/legacy-35/chat/completions"
    assert Target.of("azure", path, {"api-version": "2024-02-01"}, {"model": "x"}) == Target(
        "azure", "legacy-35", "2024-02-01"
    )
    # Azure's v1 API and OpenAI-shaped hosts: the body's model.
    assert Target.of("azure", "/openai/v1/chat/completions", {}, {"model": "prod-4o"}) == Target(
        "azure", "prod-4o", ""
    )
    assert Target.of("vllm", "/v1/completions", {}, {"model": 7}) == Target("vllm", "", "")
    assert str(Target("azure", "legacy-35", "2024-02-01")) == (
        "azure legacy-35 (api-version 2024-02-01)"
    )
    # The client chooses the names: bounded and inert before they are kept or logged.
    long = Target.of("openai", "/v1/chat/completions", {}, {"model": "m\n" + "x" * 500})
    assert "\n" not in long.name and len(long.name) <= 256


def test_a_refusal_expires_after_an_hour() -> None:
    assert TTL_SECONDS == 3600.0
    clock = Clock()
    refusals = Refusals(clock=clock)
    old, new = Target("azure", "legacy-35", "2024-02-01"), Target("azure", "prod-4o", "2024-10-21")
    refusals.add(old)
    assert refusals.refused(old) and not refusals.refused(new)
    assert not refusals.refused(Target("azure", "legacy-35", "2024-10-21"))
    clock.now += 3599.999
    assert refusals.refused(old)
    clock.now += 0.001
    assert not refusals.refused(old) and len(refusals) == 0


def test_at_most_max_targets_are_remembered_oldest_refusal_forgotten_first() -> None:
    assert MAX_TARGETS == 1024
    clock = Clock()
    refusals = Refusals(max_targets=3, clock=clock)
    targets = [Target("openai", f"m{i}", "") for i in range(4)]
    for t in targets[:3]:
        refusals.add(t)
        clock.now += 1
    refusals.add(targets[0])  # refused again: now the newest
    refusals.add(targets[3])
    assert len(refusals) == 3
    assert [refusals.refused(t) for t in targets] == [True, False, True, True]
