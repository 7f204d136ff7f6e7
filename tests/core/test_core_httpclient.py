"""tailmon.httpclient against a hostile server on loopback (tests/hostile_http.py): redirects are
failures that carry no credentials anywhere, the timeout is a total deadline, the body is capped."""

import shutil
import subprocess
import time

import pytest

from hostile_http import hostile_pair  # tests/ is on sys.path
from tailmon.httpclient import Redirected, TimedOut, TooLarge, Unreachable, mask_url, request

MiB = 1024 * 1024


@pytest.fixture
def servers():
    main, other = hostile_pair(drip=0.25, huge=40 * MiB)
    yield main, other
    main.close()
    other.close()


def test_a_cross_origin_redirect_is_a_failure_and_the_key_goes_nowhere(servers):
    """Catches following redirects (urllib's default): the POST became a GET on the other host,
    carrying the bearer token, and its reply was used."""
    main, other = servers
    with pytest.raises(Redirected) as err:
        request(main.url + "/redirect-cross?api_key=hunter2", method="POST", body=b"{}",
                headers={"Authorization": "Bearer s3cret"}, timeout=5, max_bytes=MiB)
    assert other.requests == []  # nothing reached the other origin, so neither did the key
    message = str(err.value)
    assert "302" in message and other.url + "/steal" in message and "does not follow redirects" in message
    assert "hunter2" not in message and "s3cret" not in message and "api_key=***" in message
    assert "\n" not in message


def test_a_same_origin_redirect_is_a_failure_too(servers):
    """Catches following same-origin redirects: a 307 re-sends the POST, a 302/303 turns it into
    a GET; either way the configured URL is not the one answering, which its operator must fix."""
    main, _ = servers
    with pytest.raises(Redirected) as err:
        request(main.url + "/redirect-same", method="POST", body=b"{}", timeout=5, max_bytes=MiB)
    assert [path for _, path, _ in main.requests] == ["/redirect-same"]
    assert err.value.status == 307 and main.url + "/ok" in str(err.value)


@pytest.mark.parametrize("path", ["/drip-headers", "/drip-body"])
def test_the_timeout_is_a_total_deadline(servers, path):
    """Catches a per-read timeout: the server sends a byte every 0.25 s, so no single read waits
    1 s, and a per-read timeout of 1 s would let /drip-body run 250 s (/drip-headers ~10 s)."""
    main, _ = servers
    start = time.monotonic()
    with pytest.raises(TimedOut, match=r"timed out \(no answer within 1 s\)"):
        request(main.url + path, timeout=1.0, max_bytes=MiB)
    # 1 s deadline + one drip interval for the watchdog's shutdown to land, + scheduling slack
    assert time.monotonic() - start < 2.5


def test_a_huge_body_is_cut_at_the_cap(servers):
    """Catches reading the whole body: the server has 40 MiB to send, the client stops at 1 MiB."""
    main, _ = servers
    with pytest.raises(TooLarge, match=r"larger than the 1 MiB tailmon reads"):
        request(main.url + "/huge", timeout=10, max_bytes=MiB)
    assert main.sent < 20 * MiB  # the server stopped when the client hung up (socket buffers aside)


def test_a_declared_huge_body_fails_before_reading():
    """Catches trusting Content-Length: 600 MB declared is refused without waiting for it."""
    main, other = hostile_pair()
    try:
        with pytest.raises(TooLarge, match=r"629145600 bytes"):
            request(main.url + "/huge-declared", timeout=5, max_bytes=MiB)
    finally:
        main.close()
        other.close()


def test_truncate_keeps_the_first_bytes(servers):
    """Sinks only need the status: `truncate` returns the capped body instead of failing."""
    main, _ = servers
    reply = request(main.url + "/huge", timeout=10, max_bytes=1000, truncate=True)
    assert reply.status == 200 and len(reply.body) == 1000


def test_an_ordinary_reply_and_a_closed_port(servers):
    main, _ = servers
    reply = request(main.url + "/ok", method="POST", body=b"{}", timeout=5, max_bytes=MiB)
    assert reply.status == 200 and reply.body == b'{"ok": true}'
    with pytest.raises(Unreachable, match="refused"):
        request("http://127.0.0.1:9/x", timeout=2, max_bytes=MiB)


def test_mask_url():
    """Credentials never appear in a masked URL (user info, query values)."""
    assert mask_url("https://user:pw@host:8/p/a?token=abc&x=1#frag") == "https://***@host:8/p/a?token=***&x=***"
    assert mask_url("http://h/p") == "http://h/p"


def test_https_has_the_same_limits(tmp_path, monkeypatch):
    """The same three limits over TLS, where the deadline must shut down the socket under the TLS
    layer (catches a watchdog that only knew the plain TCP socket, detached by the TLS wrap)."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to make a certificate for the loopback HTTPS server")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1", "-days", "1"],
                   check=True, capture_output=True)
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))  # the default context trusts it, and only it
    main, other = hostile_pair(drip=0.25, huge=40 * MiB, tls=(str(cert), str(key)))
    try:
        assert request(main.url + "/ok", timeout=5, max_bytes=MiB).body == b'{"ok": true}'
        start = time.monotonic()
        with pytest.raises(TimedOut):
            request(main.url + "/drip-body", timeout=1.0, max_bytes=MiB)
        assert time.monotonic() - start < 2.5
        with pytest.raises(TooLarge):
            request(main.url + "/huge", timeout=10, max_bytes=MiB)
        with pytest.raises(Redirected):
            request(main.url + "/redirect-cross", timeout=5, max_bytes=MiB, headers={"Authorization": "Bearer k"})
        assert other.requests == []
    finally:
        main.close()
        other.close()
