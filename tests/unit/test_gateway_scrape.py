"""Merging the replicas' expositions into one: labels added, clashes renamed, one family per
name, `_created` series dropped, a type conflict skipped rather than breaking the output."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from gateway.scrape import (
    Scrape,
    Target,
    merge,
    parse,
    relabel,
    render,
    target_for,
    up_family,
)


def exposition(build: str) -> str:
    registry = CollectorRegistry()
    if build == "counter":
        Counter("secumail_x", "x", ["verdict"], registry=registry).labels("clean").inc(3)
    else:
        Histogram("secumail_t_seconds", "t", buckets=(0.1, 1), registry=registry).observe(0.5)
    return generate_latest(registry).decode()


def test_created_series_are_dropped_and_labels_added() -> None:
    families = relabel(parse(exposition("histogram")), {"service": "spamd", "instance": "a:1"})
    assert [f.name for f in families] == ["secumail_t_seconds"]
    assert {tuple(sorted(s.labels.items())) for s in families[0].samples
            if s.name == "secumail_t_seconds_count"} == {(("instance", "a:1"),
                                                          ("service", "spamd"))}


def test_families_of_several_replicas_merge_into_one() -> None:
    groups = [relabel(parse(exposition("counter")), {"service": "clamav", "instance": i})
              for i in ("a:9100", "b:9100")]
    text = render(merge(groups)).decode()
    assert text.count("# TYPE secumail_x_total counter") == 1
    [family] = text_string_to_metric_families(text)
    assert sorted(s.labels["instance"] for s in family.samples) == ["a:9100", "b:9100"]


def test_a_type_conflict_keeps_the_first_family_whole() -> None:
    counter = relabel(parse(exposition("counter")), {"service": "a", "instance": "1"})
    clash = parse("# TYPE secumail_x gauge\nsecumail_x 7\n")
    merged = merge([counter, clash])
    assert len(merged) == 1 and merged[0].type == "counter"
    assert [s.value for s in merged[0].samples] == [3.0]


def test_up_says_which_replica_did_not_answer() -> None:
    family = up_family([Scrape(Target("policy", "a:9100"), []),
                        Scrape(Target("policy", "b:9100"), [], error="ConnectError")])
    assert [(s.labels["instance"], s.value) for s in family.samples] == [("a:9100", 1),
                                                                         ("b:9100", 0)]


def test_target_url() -> None:
    assert Target("clamav", "[2001:db8::1]:9100").url == "http://[2001:db8::1]:9100/metrics"


def test_replicas_are_labelled_by_container_name_as_health_names_them() -> None:
    named = target_for("clamav", "172.29.125.4", 9100, "secumail_clamav_2")
    unnamed = target_for("clamav", "172.29.125.5", 9100)
    family = up_family([Scrape(named, []), Scrape(unnamed, [], error="ConnectError")])
    assert [s.labels["container"] for s in family.samples] == ["secumail_clamav_2",
                                                              "172.29.125.5:9100"]
    assert family.samples[0].labels["instance"] == "172.29.125.4:9100"
