"""`KeyIdentities.of_headers`: the record's identity from a request's headers, memoised by
the `Authorization` value, must be what `key_from_headers` and `lookup` say, and bounded."""

from __future__ import annotations

from multidict import CIMultiDict

from meter.identity import KeyIdentities, key_from_headers, key_id

CASES = [
    [("Authorization", "Bearer sk-proj-abcdef123456")],
    [("authorization", "bearer   sk-spaced-key-9876  ")],
    [("Authorization", "Bearer ")],  # no token: the other headers
    [("Authorization", "Bearer "), ("x-api-key", "sk-x-api-key-0001")],
    [("Authorization", "Basic dXNlcjpwYXNz"), ("api-key", "azure-key-0002")],
    [("Authorization", "Basic dXNlcjpwYXNz")],
    [("x-api-key", ""), ("api-key", "azure-key-0003")],
    [("Authorization", "Bearer " + "k" * 400)],  # longer than any real key
    [],
]


def _reference(identities: KeyIdentities, headers: CIMultiDict[str]) -> tuple[str, str, str | None] | None:
    key = key_from_headers(headers)
    return identities.lookup(key) if key else None


def test_of_headers_is_key_from_headers_then_lookup_cold_and_warm() -> None:
    named = KeyIdentities({key_id("sk-proj-abcdef123456"): "search"})
    reference = KeyIdentities({key_id("sk-proj-abcdef123456"): "search"})
    for _ in range(2):  # the second pass reads the memo
        for pairs in CASES:
            headers = CIMultiDict(pairs)
            assert named.of_headers(headers) == _reference(reference, headers), pairs
    assert named.of_headers(CIMultiDict(CASES[0])) == (key_id("sk-proj-abcdef123456"), "sk-...3456", "search")


def test_of_headers_memo_is_bounded() -> None:
    identities = KeyIdentities(max_entries=50)
    for i in range(1000):
        assert identities.of_headers({"Authorization": f"Bearer sk-{i:08d}"}) == identities.lookup(f"sk-{i:08d}")
    assert len(identities._by_authorization) <= 50
    identities.of_headers({"Authorization": "Bearer " + "k" * 5000})
    assert all(len(auth) <= 256 for auth in identities._by_authorization)
