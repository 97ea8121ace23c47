"""Pure tests of media keys and signed media URLs (charai.core.media)."""

from __future__ import annotations

import urllib.parse
from urllib.parse import parse_qs, urlsplit

import pytest
from charai.core.media import CONTENT_TYPES, UrlSigner, content_type_of, media_key, valid_key
from hypothesis import given
from hypothesis import strategies as st

TASK_ID = "task_" + "0123456789abcdef" * 2
KEY = f"{TASK_ID}.png"
NOW = 1_760_000_000.0
TTL = 7 * 24 * 3600
SECRET = b"s" * 32

task_ids = st.from_regex(r"task_[0-9a-f]{32}", fullmatch=True)
extensions = st.sampled_from(sorted(CONTENT_TYPES))


def split(url: str) -> tuple[str, str, str, str]:
    """(path prefix, key, exp, sig) of a signed URL."""
    parts = urlsplit(url)
    prefix, _, key = parts.path.rpartition("/")
    query = parse_qs(parts.query, strict_parsing=True)
    assert set(query) == {"exp", "sig"}
    return prefix, key, query["exp"][0], query["sig"][0]


# --- keys ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("extension", sorted(CONTENT_TYPES))
def test_media_key_for_each_type(extension: str) -> None:
    key = media_key(TASK_ID, extension)
    assert key == f"{TASK_ID}.{extension}"
    assert valid_key(key)
    assert content_type_of(key) == CONTENT_TYPES[extension]


def test_content_types() -> None:
    assert content_type_of(KEY) == "image/png"
    assert content_type_of(f"{TASK_ID}.mp3") == "audio/mpeg"
    assert content_type_of(f"{TASK_ID}.wav") == "audio/wav"
    assert content_type_of("whatever.exe") == "application/octet-stream"
    assert content_type_of("noextension") == "application/octet-stream"


@pytest.mark.parametrize(
    ("task_id", "extension"),
    [
        ("../" + TASK_ID, "png"),
        (TASK_ID + "/..", "png"),
        ("/etc/passwd", "png"),
        ("task_" + "0" * 31, "png"),
        ("task_" + "A" * 32, "png"),
        (TASK_ID, "exe"),
        (TASK_ID, "png/../../x"),
        (TASK_ID, "PNG"),
        (TASK_ID, ""),
        ("", "png"),
    ],
)
def test_media_key_refuses_anything_but_a_task_id_and_known_type(task_id: str, extension: str) -> None:
    with pytest.raises(ValueError, match="not a media key"):
        media_key(task_id, extension)


@pytest.mark.parametrize(
    "key",
    [
        "",
        "../" + KEY,
        "..%2f" + KEY,
        "/" + KEY,
        KEY + "/..",
        "a/" + KEY,
        TASK_ID,
        TASK_ID + ".png.png",
        TASK_ID + ".",
        TASK_ID + "..png",
        "..",
        "task_" + "0" * 32 + ".png\x00",
        KEY.replace("task_", "TASK_"),
        " " + KEY,
        KEY + " ",
    ],
)
def test_valid_key_refuses_traversal_and_junk(key: str) -> None:
    assert not valid_key(key)


def test_valid_key_refuses_a_trailing_newline() -> None:
    """BUG (libs/core/src/charai/core/media.py:21): ``_KEY = ^task_[0-9a-f]{32}\\.(...)$`` used with
    ``re.match``: ``$`` matches before a final "\\n", so ``valid_key(KEY + "\\n")`` is True (and
    ``media_key(TASK_ID, "png\\n")`` returns a key ending in a newline). The gateway's
    /media/{key} route (services/gateway/src/charai/gateway/http.py:19) then lets a "%0A"-suffixed key
    through to the object store. Use ``re.fullmatch`` or ``\\Z``.
    """
    assert not valid_key(KEY + "\n"), "a key ending in a newline must not be valid"


@given(task_ids, extensions)
def test_media_key_round_trips(task_id: str, extension: str) -> None:
    key = media_key(task_id, extension)
    assert valid_key(key)
    assert key.startswith(task_id)
    assert "/" not in key
    assert ".." not in key


@given(st.text(max_size=60))
def test_valid_keys_never_contain_path_separators(key: str) -> None:
    if valid_key(key):
        assert "/" not in key
        assert "\\" not in key
        assert ".." not in key
        assert key.startswith("task_")


# --- signed URLs ------------------------------------------------------------------------------------------


def test_sign_then_verify() -> None:
    signer = UrlSigner(SECRET, TTL)
    url = signer.sign("https://charai.example/", KEY, now=NOW)
    prefix, key, exp, sig = split(url)
    assert url.startswith("https://charai.example/media/")
    assert "//media" not in url
    assert prefix == "/media"
    assert key == KEY
    assert signer.verify(key, exp, sig, now=NOW)
    assert signer.verify(key, exp, sig, now=NOW + TTL)  # valid for at least the TTL


def test_expiry_is_rounded_up_to_the_hour() -> None:
    signer = UrlSigner(SECRET, TTL)
    _, _, exp, _ = split(signer.sign("http://h", KEY, now=NOW))
    assert int(exp) % 3600 == 0
    assert NOW + TTL < int(exp) <= NOW + TTL + 3600


def test_repeated_reads_in_the_same_hour_give_the_same_url() -> None:
    signer = UrlSigner(SECRET, TTL)
    start = NOW - NOW % 3600  # the top of an hour
    urls = {signer.sign("http://h", KEY, now=start + offset) for offset in (0, 1, 600, 3599)}
    assert len(urls) == 1


def test_expired_url_is_refused() -> None:
    signer = UrlSigner(SECRET, TTL)
    _, key, exp, sig = split(signer.sign("http://h", KEY, now=NOW))
    assert signer.verify(key, exp, sig, now=int(exp))  # the last valid second
    assert not signer.verify(key, exp, sig, now=int(exp) + 1)
    assert not signer.verify(key, exp, sig, now=NOW + TTL + 7200)


def test_tampered_key_is_refused() -> None:
    signer = UrlSigner(SECRET, TTL)
    _, _, exp, sig = split(signer.sign("http://h", KEY, now=NOW))
    other = "task_" + "f" * 32 + ".png"
    assert not signer.verify(other, exp, sig, now=NOW)
    assert not signer.verify(f"{TASK_ID}.wav", exp, sig, now=NOW)


def test_tampered_expiry_is_refused() -> None:
    signer = UrlSigner(SECRET, TTL)
    _, key, exp, sig = split(signer.sign("http://h", KEY, now=NOW))
    assert not signer.verify(key, str(int(exp) + 3600), sig, now=NOW)
    assert not signer.verify(key, str(int(exp) - 3600), sig, now=NOW)


def test_tampered_signature_is_refused() -> None:
    signer = UrlSigner(SECRET, TTL)
    _, key, exp, sig = split(signer.sign("http://h", KEY, now=NOW))
    for i in range(len(sig)):
        flipped = sig[:i] + ("A" if sig[i] != "A" else "B") + sig[i + 1 :]
        assert not signer.verify(key, exp, flipped, now=NOW)
    assert not signer.verify(key, exp, "", now=NOW)
    assert not signer.verify(key, exp, sig[:-1], now=NOW)
    assert not signer.verify(key, exp, sig + "A", now=NOW)


def test_other_secret_is_refused() -> None:
    url = UrlSigner(SECRET, TTL).sign("http://h", KEY, now=NOW)
    _, key, exp, sig = split(url)
    assert not UrlSigner(b"another secret", TTL).verify(key, exp, sig, now=NOW)


@pytest.mark.parametrize("exp", ["", "-1", "+99999999999", "1e12", "0x7fffffff", " 99999999999", "abc"])
def test_malformed_expiry_is_refused(exp: str) -> None:
    signer = UrlSigner(SECRET, TTL)
    assert not signer.verify(KEY, exp, "x", now=NOW)


@pytest.mark.parametrize(
    "exp",
    [
        "²",  # str.isdigit() is True for superscripts, int() refuses them
        "9" * 5000,  # int() refuses more than 4300 digits (CPython's int_max_str_digits)
    ],
    ids=["superscript-two", "5000-digits"],
)
def test_verify_refuses_rather_than_raises_on_hostile_expiry(exp: str) -> None:
    """BUG (libs/core/src/charai/core/media.py:80): ``if not exp.isdigit() or int(exp) < ...``.

    ``exp`` is the client's ``?exp=`` query value (gateway http.py:17-19). ``str.isdigit`` accepts
    characters ``int`` cannot parse ("²") and ``int`` refuses > 4300-digit strings, so
    ``UrlSigner.verify`` raises ValueError: GET /media/<key>?exp=%C2%B2&sig=x gives a 500 instead of the
    403 that unknown, tampered and expired links get. Check ``exp.isascii() and exp.isdigit()`` and the
    length (or catch ValueError).
    """
    signer = UrlSigner(SECRET, TTL)
    try:
        result = signer.verify(KEY, exp, "x", now=NOW)
    except ValueError as exc:
        pytest.fail(f"UrlSigner.verify raised ValueError for exp={exp[:10]!r}...: {exc}")
    assert result is False


def test_explicit_now_of_zero_is_honoured() -> None:
    """BUG (libs/core/src/charai/core/media.py:73 and :80): ``now or time.time()`` treats an explicit
    ``now=0`` as "not given" and uses the wall clock. Use ``time.time() if now is None else now``.
    """
    signer = UrlSigner(SECRET, 60)
    _, _, exp, _ = split(signer.sign("http://h", KEY, now=0.0))
    assert int(exp) == 66, f"sign(now=0) used the wall clock: exp={exp}"  # 60 s, up to a 6 s step


@pytest.mark.parametrize(("ttl", "step"), [(60, 6), (600, 60), (7200, 720), (36_000, 3600), (TTL, 3600)])
def test_a_url_outlives_its_ttl_by_at_most_a_tenth_of_it_and_an_hour(ttl: int, step: int) -> None:
    # CHARAI_MEDIA_URL_TTL=60 gave URLs that lasted up to 61 minutes (the expiry rounded up to
    # the next hour whatever the TTL).
    signer = UrlSigner(SECRET, ttl)
    for now in (NOW, NOW + 1, NOW + 7, NOW + 3599):
        _, key, exp, sig = split(signer.sign("http://h", KEY, now=now))
        assert now + ttl < int(exp) <= now + ttl + step and int(exp) % step == 0
        assert signer.verify(key, exp, sig, now=now + ttl)
        assert not signer.verify(key, exp, sig, now=now + ttl + step + 1)


@given(
    task_ids,
    extensions,
    st.floats(0, 4e9),
    st.integers(1, 90 * 24 * 3600),
    st.binary(min_size=1, max_size=64),
)
def test_signed_urls_verify_until_expiry(
    task_id: str, extension: str, now: float, ttl: int, secret: bytes
) -> None:
    signer = UrlSigner(secret, ttl)
    key = media_key(task_id, extension)
    _, got_key, exp, sig = split(signer.sign("http://h:8080", key, now=now or 1.0))
    assert got_key == key
    assert signer.verify(key, exp, sig, now=now or 1.0)
    assert not signer.verify(key, exp, sig, now=int(exp) + 1)
    assert not UrlSigner(secret + b"x", ttl).verify(key, exp, sig, now=now or 1.0)


@given(
    st.text(alphabet=st.characters(max_codepoint=0x7F), max_size=20),
    st.text(alphabet=st.characters(max_codepoint=0x7F), max_size=40),
)
def test_verify_of_arbitrary_ascii_is_false(exp: str, sig: str) -> None:
    assert UrlSigner(SECRET, TTL).verify(KEY, exp, sig, now=NOW) is False


# --- durable URLs (CHARAI_MEDIA_URL_TTL=0, the default) and key rotation ---------------------------------


def test_a_url_of_a_signer_without_ttl_never_expires_and_cannot_be_given_an_expiry() -> None:
    signer = UrlSigner(SECRET, 0)
    url = signer.sign("https://charai.example", KEY, now=NOW)
    query = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(url).query))
    assert set(query) == {"sig"}  # no exp: nothing to run out
    assert signer.verify(KEY, "", query["sig"], now=NOW + 10 * 365 * 86_400)
    assert not signer.verify(KEY, str(NOW + 3600), query["sig"], now=NOW)  # an added expiry breaks it
    assert not signer.verify(f"{TASK_ID}.wav", "", query["sig"], now=NOW)
    assert not UrlSigner(b"another secret", 0).verify(KEY, "", query["sig"], now=NOW)
    # An expiring URL cannot be turned into a lasting one by dropping its expiry.
    _, _, _, sig = split(UrlSigner(SECRET, TTL).sign("http://h", KEY, now=NOW))
    assert not signer.verify(KEY, "", sig, now=NOW)


def test_rotated_secrets_keep_old_urls_working_until_the_old_secret_is_dropped() -> None:
    old_url = UrlSigner(b"old secret", 0).sign("http://h", KEY)
    sig = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(old_url).query))["sig"]
    rotated = UrlSigner([b"new secret", b"old secret"], 0)
    assert rotated.verify(KEY, "", sig)
    new_sig = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(rotated.sign("http://h", KEY)).query))["sig"]
    assert UrlSigner(b"new secret", 0).verify(KEY, "", new_sig)  # the first secret signs
    assert not UrlSigner(b"new secret", 0).verify(KEY, "", sig)  # dropping a secret revokes its URLs
