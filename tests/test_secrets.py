"""The key never shows: malformed keys are refused before any request without being echoed,
and whatever the endpoint sends back is redacted before it is stored or shown."""

from __future__ import annotations

import os
import stat
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import orjson
import pytest
from click.testing import CliRunner

from capi.errors import ConfigError
from capi.sandbox.state import DEFAULT_KEY, DEFAULT_PIXEL
from capi.settings import Settings
from tests.helpers import drain, enqueue, events, redis_dump
from workers.cli import cli
from workers.main import worker_settings

SECRET = "sk-svcacct-Sup3rSecretMiddle-9Qa"


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for k in list(os.environ):
        if k.startswith("CAPI_"):
            monkeypatch.delenv(k)
    monkeypatch.setenv("CAPI_CONFIG_FILE", os.devnull)


@pytest.mark.parametrize(
    ("key", "what"),
    [
        ("sk-svcacct-AAAA\nSup3rSecretMiddle", "line break"),
        ("sk-svcacct-AAAA\rSup3rSecretMiddle", "line break"),
        ("sk-svcacct-AAAA\x1bSup3rSecretMiddle", "control character"),
        ("\u201csk-svcacct-Sup3rSecretMiddle\u201d", "non-ASCII"),
        ("sk-svcacct AAAA Sup3rSecretMiddle", "space"),
        ("   ", "empty or only whitespace"),
    ],
)
@pytest.mark.parametrize("as_json", [False, True])
def test_check_key_refuses_a_malformed_key_without_echoing_it(
    clean_env: None, monkeypatch: pytest.MonkeyPatch, key: str, what: str, as_json: bool
) -> None:
    monkeypatch.setenv("CAPI_API_KEY", key)
    monkeypatch.setenv("CAPI_PIXEL_ID", DEFAULT_PIXEL)
    monkeypatch.setenv("CAPI_BASE_URL", "http://127.0.0.1:9")  # never reached
    result = CliRunner().invoke(cli, ["check-key", *(["--json"] if as_json else [])])
    assert result.exit_code == 3, result.output
    assert "CAPI_API_KEY" in result.output and what in result.output
    assert "Sup3rSecret" not in result.output
    assert "network" not in result.output.lower() and "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)


def test_worker_refuses_a_malformed_key_before_any_request(
    clean_env: None, monkeypatch: pytest.MonkeyPatch, redis_url: str
) -> None:
    monkeypatch.setenv("CAPI_API_KEY", "sk-svcacct-AAAA\nSup3rSecretMiddle")
    monkeypatch.setenv("CAPI_PIXEL_ID", DEFAULT_PIXEL)
    monkeypatch.setenv("CAPI_REDIS_URL", redis_url)
    monkeypatch.setenv("CAPI_BASE_URL", "http://127.0.0.1:9")
    result = CliRunner().invoke(cli, ["worker", "--burst"])
    assert result.exit_code == 3, result.output
    assert "line break" in result.output and "Sup3rSecret" not in result.output


class EchoServer:
    """An endpoint that echoes the Authorization header back, as some proxies do: 503 for
    the first send (a retry is scheduled), then 401 for everything (held, dead-lettered)."""

    def __init__(self) -> None:
        self.requests = 0
        echo = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length", "0")))
                echo.requests += 1
                auth = self.headers.get("Authorization", "")
                status = 503 if echo.requests == 1 else 401
                body = orjson.dumps(
                    {
                        "error": {
                            "message": f"Unauthorized: you sent Authorization: {auth}",
                            "code": "unauthorized",
                            "echo": auth,
                        }
                    }
                )
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("X-Request-Id", f"req-echo {auth}")
                self.send_header("X-Trace-Echo", auth)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST  # the Advertiser API's event monitoring (capi verify)

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> EchoServer:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def echo() -> Iterator[EchoServer]:
    with EchoServer() as server:
        yield server


def test_an_echoed_key_is_redacted_before_redis_and_every_output(
    clean_env: None,
    monkeypatch: pytest.MonkeyPatch,
    echo: EchoServer,
    redis_url: str,
    tmp_path: Path,
) -> None:
    settings = Settings(
        _env_file=None,
        api_key=SECRET,
        pixel_id=DEFAULT_PIXEL,
        base_url=echo.url,
        redis_url=redis_url,
        retry_base_s=0.01,
        retry_cap_s=0.02,
        probe_confirmations=1,
        batch_wait_ms=5,
    )
    enqueue(settings, events(1))
    drain(settings, timeout_s=30)
    assert echo.requests >= 3  # the 503, the 401, and the re-probe
    dump = redis_dump(redis_url)
    assert b"held" in dump and b"Sup3rSecret" not in dump
    assert b"<key " in dump  # the echo is kept, as the fingerprint
    for name, value in {
        "CAPI_API_KEY": SECRET,
        "CAPI_PIXEL_ID": DEFAULT_PIXEL,
        "CAPI_REDIS_URL": redis_url,
    }.items():
        monkeypatch.setenv(name, value)
    runner = CliRunner()
    export = tmp_path / "dl.jsonl"
    export.write_bytes(b"")  # an existing file is made private too
    export.chmod(0o644)
    for args in (
        ["dead-letters", "show", "p-0"],
        ["dead-letters", "show", "p-0", "--json"],
        ["dead-letters", "list", "--json"],
        ["dead-letters", "export", "-o", str(export)],
        ["support-bundle"],
        ["status", "--json"],
    ):
        result = runner.invoke(cli, args)
        assert result.exit_code == 0, (args, result.output)
        assert "Sup3rSecret" not in result.output, args
    assert b"Sup3rSecret" not in export.read_bytes() and export.read_bytes()
    assert stat.S_IMODE(export.stat().st_mode) == 0o600  # exports are private


def test_settings_repr_hides_the_redis_password() -> None:
    settings = Settings(_env_file=None, redis_url="redis://user:Pa55w0rdXYZ@redis.example:6379/0")
    assert "Pa55w0rdXYZ" not in repr(settings) and "Pa55w0rdXYZ" not in str(settings)
    assert "redis.example" in repr(settings)
    assert settings.redis_url.endswith("Pa55w0rdXYZ@redis.example:6379/0")  # still usable
    arq = worker_settings(settings)
    pool = arq["redis_pool"]
    assert "Pa55w0rdXYZ" not in repr(arq)
    assert pool.connection_pool.connection_kwargs["password"] == "Pa55w0rdXYZ"


def test_config_error_names_the_setting_without_the_key(
    clean_env: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(ConfigError, match="CAPI_API_KEY contains a line break") as info:
        Settings(_env_file=None, api_key="Sup3rSecret\nb", pixel_id="p").credentials()
    assert "Sup3rSecret" not in str(info.value)
    with pytest.raises(ConfigError, match="CAPI_API_KEY contains a control character") as info:
        Settings(_env_file=None, api_key="Sup3rSecret\0b", pixel_id="p").credentials()
    assert "Sup3rSecret" not in str(info.value)


@pytest.mark.parametrize(
    ("setting", "value", "said"),
    [
        ("CAPI_API_KEY", '"Sup3rSecret-key-0001"', "quote"),
        ("CAPI_API_KEY", "'Sup3rSecret-key-0001'", "quote"),
        ("CAPI_PIXEL_ID", '"pix_brand_a"', "in quotes"),
        ("CAPI_PIXEL_ID", "'pix_brand_a'", "in quotes"),
    ],
)
def test_a_key_or_pixel_id_in_quotes_is_refused_before_any_request(
    clean_env: None, monkeypatch: pytest.MonkeyPatch, setting: str, value: str, said: str
) -> None:
    """CAPI_API_KEY="sk-..." in a file for `docker run --env-file` keeps the quotes: the
    API answered 401 Unauthorized (exit 11: 'revoked, mistyped or truncated'); a pixel id
    so quoted was sent as ?pid="..." and answered 403 unknown pixel (exit 12)."""
    monkeypatch.setenv("CAPI_API_KEY", DEFAULT_KEY)
    monkeypatch.setenv("CAPI_PIXEL_ID", DEFAULT_PIXEL)
    monkeypatch.setenv(setting, value)
    monkeypatch.setenv("CAPI_BASE_URL", "http://127.0.0.1:9")  # never reached
    result = CliRunner().invoke(cli, ["check-key"])
    assert result.exit_code == 3, result.output
    assert setting in result.output and said in result.output
    assert "Sup3rSecret" not in result.output


def test_every_field_of_a_send_error_is_redacted(echo: EchoServer) -> None:
    """What fates, dead letters, retry metadata and the held-key state are built from."""
    import asyncio

    from capi.client import ConversionsClient
    from capi.errors import SendError
    from tests.test_client import event

    async def send() -> SendError:
        async with ConversionsClient(base_url=echo.url, api_key=SECRET, pixel_id="p") as c:
            with pytest.raises(SendError) as info:
                await c.send([event(1)])
            return info.value

    error = asyncio.run(send())
    assert error.status == 503  # the first answer: the one a retry is scheduled for
    seen = repr((str(error), error.response.message, error.response.body))
    seen += repr(error.response.request_ids)
    assert "Sup3rSecret" not in seen
    assert "<key …-9Qa" in error.response.message
    assert error.response.request_ids["x-request-id"].startswith("req-echo Bearer <key ")


@pytest.mark.parametrize("command", [["destinations", "--json"], ["check-key", "--json"]])
def test_a_key_given_as_the_pixel_id_is_refused_without_showing_it(
    clean_env: None, monkeypatch: pytest.MonkeyPatch, command: list[str]
) -> None:
    """CAPI_API_KEY and CAPI_PIXEL_ID swapped: the key would go out as ?pid= and be printed
    (and stored in dead letters and the key state) as the pixel id."""
    monkeypatch.setenv("CAPI_API_KEY", DEFAULT_PIXEL)
    monkeypatch.setenv("CAPI_PIXEL_ID", SECRET)
    monkeypatch.setenv("CAPI_BASE_URL", "http://127.0.0.1:9")  # never reached
    result = CliRunner().invoke(cli, command)
    assert result.exit_code == 3, result.output
    assert "CAPI_PIXEL_ID" in result.output and "swapped" in result.output
    assert "Sup3rSecret" not in result.output


def test_a_key_given_as_a_destinations_pixel_id_is_refused_without_showing_it(
    tmp_path: Path,
) -> None:
    from capi import destinations

    path = tmp_path / "d.toml"
    text = f'[destinations.a]\npixel_id = "{SECRET}"\napi_key_env = "K"\n'
    with pytest.raises(ConfigError, match="pixel_id") as caught:
        destinations.parse(text, path, Settings(_env_file=None), {"K": DEFAULT_PIXEL})
    assert "Sup3rSecret" not in str(caught.value)


ADVERTISER_SECRET = "sk-ads-Adv3rtiserSecretMiddle-0003"


@pytest.mark.parametrize("as_json", [False, True])
def test_verify_redacts_an_advertiser_key_the_endpoint_echoes(
    clean_env: None,
    monkeypatch: pytest.MonkeyPatch,
    echo: EchoServer,
    redis_url: str,
    as_json: bool,
) -> None:
    monkeypatch.setenv("CAPI_API_KEY", "sk-svcacct-conversion-key-0001")
    monkeypatch.setenv("CAPI_PIXEL_ID", DEFAULT_PIXEL)
    monkeypatch.setenv("CAPI_REDIS_URL", redis_url)
    monkeypatch.setenv("CAPI_ADVERTISER_KEY", ADVERTISER_SECRET)
    monkeypatch.setenv("CAPI_ADS_API_BASE_URL", echo.url)
    for status in ("HTTP 503", "HTTP 401"):  # the echo server's first answer, then the rest
        result = CliRunner().invoke(cli, ["verify", *(["--json"] if as_json else [])])
        assert status in result.output and "you sent Authorization" in result.output
        assert "Adv3rtiserSecret" not in result.output
        assert "0003 (sha256:" in result.output  # its fingerprint in its place


@pytest.mark.parametrize(
    ("key", "what"),
    [
        ("\u201csk-ads-Adv3rtiserSecretMiddle\u201d", "non-ASCII"),
        ("sk-ads-Adv3rtiser\x01SecretMiddle", "control character"),
    ],
)
def test_verify_refuses_a_malformed_advertiser_key_without_echoing_it(
    clean_env: None,
    monkeypatch: pytest.MonkeyPatch,
    echo: EchoServer,
    redis_url: str,
    key: str,
    what: str,
) -> None:
    monkeypatch.setenv("CAPI_REDIS_URL", redis_url)
    monkeypatch.setenv("CAPI_API_KEY", "sk-svcacct-conversion-key-0001")
    monkeypatch.setenv("CAPI_PIXEL_ID", DEFAULT_PIXEL)
    monkeypatch.setenv("CAPI_ADVERTISER_KEY", key)
    monkeypatch.setenv("CAPI_ADS_API_BASE_URL", echo.url)
    result = CliRunner().invoke(cli, ["verify"])
    assert result.exit_code == 3, result.output
    assert "CAPI_ADVERTISER_KEY" in result.output and what in result.output
    assert "Adv3rtiser" not in result.output and "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert echo.requests == 0


@pytest.mark.parametrize(
    "url",
    [
        "redis://:Xy7Secr3t/Rest@redis.example:6379/0",  # a base64 password: / and +
        "redis://:1234/Secr3tRest@redis.example:6379/0",  # the part before / reads as a port
        "redis://user:Pa55#Secr3t@redis.example:6379/0",
        "rediss://:Pa55?Secr3t@redis.example:6380",
    ],
)
def test_a_redis_password_with_a_reserved_character_is_not_shown(
    clean_env: None, monkeypatch: pytest.MonkeyPatch, url: str
) -> None:
    """urlsplit ends the host at the first / ? or # of an unencoded password: the rest of
    the password then read as the port or the database, which the error quoted."""
    monkeypatch.setenv("CAPI_REDIS_URL", url)
    result = CliRunner().invoke(cli, ["status"])
    assert result.exit_code == 3, result.output
    assert "CAPI_REDIS_URL" in result.output and "percent-encode" in result.output
    for part in ("Xy7", "Secr3t", "Pa55", "1234", "Rest"):
        assert part not in result.output


@pytest.mark.parametrize("field", ["api_key_file", "advertiser_key_file"])
def test_a_key_given_as_a_key_files_path_is_refused_without_showing_it(
    tmp_path: Path, field: str
) -> None:
    """The key pasted where the path of its file goes: 'cannot read api_key_file
    sk-svcacct-...' printed it (check-key, the worker's log, capi verify)."""
    from capi import destinations

    path = tmp_path / "d.toml"
    extra = 'api_key_env = "K"\n' if field != "api_key_file" else ""
    text = f'[destinations.a]\npixel_id = "p"\n{extra}{field} = "{SECRET}"\n'
    with pytest.raises(ConfigError, match=field) as caught:
        destinations.parse(text, path, Settings(_env_file=None), {"K": "sk-svcacct-0001-key"})
    assert "Sup3rSecret" not in str(caught.value)
