"""Settings: flag > env > file > default, the config file, errors that name the setting."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from yarl import URL

from closeproxy.config import (
    DEFAULT_PORT,
    OPTIONS_BY_NAME,
    Settings,
    default_config_file,
    load_settings,
)
from closeproxy.errors import ConfigError

CLIENT_SECRET = "cs_0123456789abcdef-client-secret"
PROXY_KEY = "pk_fedcba9876543210-proxy-key"


@pytest.fixture
def user_config(tmp_path: Path) -> Path:
    """Where the config file lives by default: the autouse fixture points XDG there."""
    return tmp_path / "xdg-config" / "closeproxy" / "config.toml"


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def config_error(
    flags: dict[str, Any] | None = None,
    environ: dict[str, str] | None = None,
    *,
    config_file: str | None = None,
) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_settings(flags, environ or {}, config_file=config_file)
    assert info.value.exit_code == 2
    return info.value


# --- precedence ----------------------------------------------------------------------


# setting, flag value, env value, TOML literal for the file, and the parsed value of each
PRECEDENCE: list[tuple[str, Any, str, str, tuple[Any, Any, Any]]] = [
    ("port", "9001", "9002", "9003", (9001, 9002, 9003)),
    (
        "api_url",
        "http://flag.example",
        "http://env.example/",
        '"https://file.example/base/"',
        (
            URL("http://flag.example"),
            URL("http://env.example"),
            URL("https://file.example/base"),
        ),
    ),
    ("refresh_margin", "10", "20.5", "30", (10.0, 20.5, 30.0)),
    (
        "allowed_hosts",
        ["flag.example", "Second.Example"],
        "env.example, two.example,",
        '["file.example"]',
        (("flag.example", "second.example"), ("env.example", "two.example"), ("file.example",)),
    ),
]


@pytest.mark.parametrize(
    ("name", "flag", "env", "file", "parsed"), PRECEDENCE, ids=[p[0] for p in PRECEDENCE]
)
def test_flag_beats_env_beats_file_beats_default(
    user_config: Path,
    name: str,
    flag: Any,
    env: str,
    file: str,
    parsed: tuple[Any, Any, Any],
) -> None:
    option = OPTIONS_BY_NAME[name]
    write(user_config, f"{option.key} = {file}\n")
    environ = {option.env: env}

    everything = load_settings({name: flag}, environ)
    assert getattr(everything, name) == parsed[0]
    assert everything.source(name) == option.flag

    no_flag = load_settings({name: None}, environ)  # argparse gives None when not given
    assert getattr(no_flag, name) == parsed[1]
    assert no_flag.source(name) == f"environment variable {option.env}"

    file_only = load_settings({}, {})
    assert getattr(file_only, name) == parsed[2]
    assert file_only.source(name) == f"config file {user_config} ({option.key})"
    assert file_only.config_file == user_config

    user_config.unlink()
    default = load_settings({}, {})
    assert getattr(default, name) == getattr(Settings(), name)
    assert default.source(name) == "default"
    assert name not in default.sources
    assert default.config_file is None


def test_token_file_precedence_and_default_location(
    tmp_path: Path, user_config: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    write(user_config, 'token_file = "from-file.json"\n')
    env = {"CLOSEPROXY_TOKEN_FILE": str(tmp_path / "from-env.json")}

    assert load_settings({"token_file": "from-flag.json"}, env).token_file == (
        tmp_path / "from-flag.json"
    )
    assert load_settings({}, env).token_file == tmp_path / "from-env.json"
    assert load_settings({}, {}).token_file == user_config.parent / "from-file.json"
    user_config.unlink()
    assert load_settings({}, {}).token_file == (
        tmp_path / "xdg-data" / "closeproxy" / "tokens.json"
    )


def test_defaults_match_the_spec() -> None:
    settings = load_settings({}, {})
    assert settings.port == DEFAULT_PORT == 8730
    assert settings.host == "127.0.0.1"
    assert str(settings.api_url) == "https://api.close.com"
    assert str(settings.app_url) == "https://app.close.com"
    assert settings.refresh_margin == 300
    assert settings.upstream_timeout == 60
    assert (settings.log_format, settings.log_level) == ("text", "info")
    assert settings.allowed_hosts == ()
    assert settings.client_id is None
    assert settings.client_secret is None
    assert settings.proxy_key is None
    assert settings.sources == {}


def test_port_zero_from_a_flag_is_kept(user_config: Path) -> None:
    write(user_config, "port = 9003\n")
    settings = load_settings({"port": 0}, {})
    assert settings.port == 0
    assert settings.source("port") == "--port"


def test_an_empty_environment_variable_counts_as_unset(user_config: Path) -> None:
    write(user_config, "port = 9003\n")
    settings = load_settings({}, {"CLOSEPROXY_PORT": ""})
    assert settings.port == 9003
    assert settings.source("port") == f"config file {user_config} (port)"


def test_each_setting_comes_from_its_own_place(tmp_path: Path, user_config: Path) -> None:
    write(user_config, 'log_level = "debug"\nport = 9003\nhost = "::1"\n')
    settings = load_settings(
        {"port": "9001"},
        {"CLOSEPROXY_LOG_LEVEL": "WARNING", "CLOSEPROXY_CLIENT_ID": "cid"},
    )
    assert (settings.port, settings.log_level, settings.host) == (9001, "warning", "::1")
    assert settings.client_id == "cid"
    assert settings.sources == {
        "port": "--port",
        "log_level": "environment variable CLOSEPROXY_LOG_LEVEL",
        "client_id": "environment variable CLOSEPROXY_CLIENT_ID",
        "host": f"config file {user_config} (host)",
    }


# --- the config file -----------------------------------------------------------------


def test_default_config_file_is_in_the_xdg_config_directory(user_config: Path) -> None:
    assert default_config_file() == user_config


def test_config_flag_and_env_choose_another_file(tmp_path: Path, user_config: Path) -> None:
    write(user_config, "this is not TOML at all = = =\n")  # never read when another is chosen
    by_flag = write(tmp_path / "a" / "flag.toml", "port = 1111\n")
    by_env = write(tmp_path / "b" / "env.toml", "port = 2222\n")

    settings = load_settings({}, {}, config_file=str(by_flag))
    assert (settings.port, settings.config_file) == (1111, by_flag)
    settings = load_settings({}, {"CLOSEPROXY_CONFIG": str(by_env)})
    assert (settings.port, settings.config_file) == (2222, by_env)
    settings = load_settings({}, {"CLOSEPROXY_CONFIG": str(by_env)}, config_file=str(by_flag))
    assert settings.port == 1111  # --config wins over CLOSEPROXY_CONFIG


@pytest.mark.parametrize("how", ["--config", "CLOSEPROXY_CONFIG"])
def test_an_explicit_config_file_that_does_not_exist_is_an_error(tmp_path: Path, how: str) -> None:
    missing = tmp_path / "nowhere" / "config.toml"
    if how == "--config":
        error = config_error(config_file=str(missing))
    else:
        error = config_error(environ={"CLOSEPROXY_CONFIG": str(missing)})
    assert str(missing) in str(error)
    assert how in str(error)
    assert "does not exist" in str(error)


def test_a_missing_default_config_file_is_fine(user_config: Path) -> None:
    assert not user_config.exists()
    assert load_settings({}, {}).port == DEFAULT_PORT


@pytest.mark.parametrize("explicit", [True, False], ids=["explicit", "default"])
def test_invalid_toml_is_an_error_naming_the_file(
    tmp_path: Path, user_config: Path, explicit: bool
) -> None:
    path = tmp_path / "bad.toml" if explicit else user_config
    write(path, 'port = 9000\nhost = "unterminated\n')
    error = config_error(config_file=str(path) if explicit else None)
    assert str(path) in str(error)
    assert "not valid TOML" in str(error)


def test_an_unknown_key_is_an_error_naming_it(user_config: Path) -> None:
    write(user_config, "port = 9000\nprot = 9001\n")
    error = config_error()
    assert "'prot'" in str(error)
    assert str(user_config) in str(error)
    assert "port" in str(error).split("known settings are", 1)[1]  # the spelling it wanted
    assert error.setting == "prot"


def test_a_secret_written_into_the_config_file_is_refused_without_echoing_it(
    user_config: Path,
) -> None:
    write(user_config, f'client_secret = "{CLIENT_SECRET}"\n')
    error = config_error()
    assert "'client_secret'" in str(error)
    assert "client_secret_file" in str(error)  # points at the key that does exist
    assert CLIENT_SECRET not in str(error)


def test_relative_paths_in_the_config_file_are_relative_to_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    conf_dir = tmp_path / "conf"
    write(conf_dir / "secret.txt", f"{CLIENT_SECRET}\n")
    write(conf_dir / "keys" / "proxy.key", PROXY_KEY)
    config = write(
        conf_dir / "config.toml",
        'token_file = "data/tokens.json"\n'
        'client_secret_file = "secret.txt"\n'
        'proxy_key_file = "keys/proxy.key"\n'
        'unix_socket = "run/closeproxy.sock"\n',
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)

    settings = load_settings({}, {}, config_file=str(config))
    base = conf_dir.resolve()
    assert settings.token_file == base / "data" / "tokens.json"
    assert settings.unix_socket == base / "run" / "closeproxy.sock"
    assert settings.client_secret is not None
    assert settings.client_secret.reveal() == CLIENT_SECRET
    assert settings.proxy_key is not None
    assert settings.proxy_key.reveal() == PROXY_KEY


def test_relative_paths_from_flags_and_env_are_relative_to_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert load_settings({"token_file": "t/flag.json"}, {}).token_file == tmp_path / "t/flag.json"
    settings = load_settings({}, {"CLOSEPROXY_TOKEN_FILE": "t/env.json"})
    assert settings.token_file == tmp_path / "t" / "env.json"
    assert settings.token_file.is_absolute()


# --- bad values ----------------------------------------------------------------------

# setting, value as a flag or environment variable, the same value as a TOML literal
BAD_VALUES: list[Any] = [
    pytest.param("port", "70000", "70000", id="port-too-big"),
    pytest.param("port", "abc", '"abc"', id="port-not-a-number"),
    pytest.param("port", "-1", "-1", id="port-negative"),
    pytest.param("refresh_margin", "-5", "-5", id="margin-negative"),
    pytest.param("refresh_margin", "soon", '"soon"', id="margin-not-a-number"),
    pytest.param("upstream_timeout", "0", "0", id="timeout-zero"),
    pytest.param("upstream_timeout", "nan", "nan", id="timeout-nan"),
    pytest.param("api_url", "ftp://x", '"ftp://x"', id="api-url-ftp"),
    pytest.param(
        "api_url", "https://api.example.com/?x=1", '"https://api.example.com/?x=1"', id="query"
    ),
    pytest.param("api_url", "api.close.com", '"api.close.com"', id="api-url-no-scheme"),
    pytest.param(
        "app_url", "https://u:p@app.example.com", '"https://u:p@app.example.com"', id="app-url-user"
    ),
    pytest.param("log_level", "loud", '"loud"', id="log-level"),
    pytest.param("log_format", "xml", '"xml"', id="log-format"),
    pytest.param("allowed_hosts", "a:80", '["a:80"]', id="allow-host-port"),
    pytest.param("allowed_hosts", "http://a", '["http://a"]', id="allow-host-scheme"),
    pytest.param("max_body_size", "lots", '"lots"', id="max-body-size"),
    pytest.param("redirect_uri", "ftp://x/cb", '"ftp://x/cb"', id="redirect-uri-scheme"),
    pytest.param(
        "redirect_uri",
        "http://127.0.0.1:99999/callback",
        '"http://127.0.0.1:99999/callback"',
        id="redirect-uri-bad-port",
    ),
]


@pytest.mark.parametrize(("name", "raw", "toml"), BAD_VALUES)
@pytest.mark.parametrize("origin", ["flag", "env", "file"])
def test_a_bad_value_names_the_setting_its_origin_and_the_value(
    tmp_path: Path, origin: str, name: str, raw: str, toml: str
) -> None:
    option = OPTIONS_BY_NAME[name]
    config = tmp_path / "config.toml"
    if origin == "flag":
        error = config_error({name: [raw] if option.repeatable else raw})
        where = option.flag
    elif origin == "env":
        error = config_error(environ={option.env: raw})
        where = f"environment variable {option.env}"
    else:
        write(config, f"{option.key} = {toml}\n")
        error = config_error(config_file=str(config))
        where = f"config file {config} ({option.key})"
    message = str(error)
    assert message.startswith(where), message
    assert raw in message, message
    assert error.setting == name


def test_the_first_bad_host_in_a_comma_separated_list_is_named() -> None:
    error = config_error(environ={"CLOSEPROXY_ALLOWED_HOSTS": "good.example, bad.example:8080"})
    assert "bad.example:8080" in str(error)
    assert "CLOSEPROXY_ALLOWED_HOSTS" in str(error)


def test_ipv6_allowed_hosts_are_bracketed() -> None:
    settings = load_settings({"allowed_hosts": ["::1", "[fe80::1]", "Proxy.LAN"]}, {})
    assert settings.allowed_hosts == ("[::1]", "[fe80::1]", "proxy.lan")


# --- secrets -------------------------------------------------------------------------

SECRET_OPTIONS = [
    pytest.param("client_secret", CLIENT_SECRET, id="client-secret"),
    pytest.param("proxy_key", PROXY_KEY, id="proxy-key"),
]


@pytest.mark.parametrize(("name", "value"), SECRET_OPTIONS)
def test_a_secret_is_read_from_a_file_named_by_the_flag_whitespace_stripped(
    tmp_path: Path, name: str, value: str
) -> None:
    secret_file = write(tmp_path / "secret", f"  {value}\r\n\n")
    settings = load_settings({name: str(secret_file)}, {})
    secret = getattr(settings, name)
    assert secret.reveal() == value
    assert settings.source(name) == OPTIONS_BY_NAME[name].flag


@pytest.mark.parametrize(("name", "value"), SECRET_OPTIONS)
def test_a_secret_is_read_from_a_file_named_in_the_config_file(
    tmp_path: Path, user_config: Path, name: str, value: str
) -> None:
    write(tmp_path / "secret", f"{value}\n")
    write(user_config, f"{OPTIONS_BY_NAME[name].key} = {json.dumps(str(tmp_path / 'secret'))}\n")
    assert getattr(load_settings({}, {}), name).reveal() == value


@pytest.mark.parametrize(("name", "value"), SECRET_OPTIONS)
def test_the_environment_variable_holds_the_secret_itself(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, value: str
) -> None:
    monkeypatch.chdir(tmp_path)
    write(tmp_path / value, "not-the-secret")  # a file of that name must not be read
    settings = load_settings({}, {OPTIONS_BY_NAME[name].env: f" {value}\n"})
    assert getattr(settings, name).reveal() == value


@pytest.mark.parametrize(("name", "value"), SECRET_OPTIONS)
@pytest.mark.parametrize("content", ["", "  \n\n"], ids=["empty", "blank"])
def test_an_empty_secret_file_is_an_error(
    tmp_path: Path, name: str, value: str, content: str
) -> None:
    secret_file = write(tmp_path / "secret", content)
    error = config_error({name: str(secret_file)})
    assert str(error).startswith(OPTIONS_BY_NAME[name].flag)
    assert str(secret_file) in str(error)
    assert "empty" in str(error)
    assert error.setting == name


@pytest.mark.parametrize(("name", "value"), SECRET_OPTIONS)
def test_a_missing_secret_file_is_an_error(
    tmp_path: Path, user_config: Path, name: str, value: str
) -> None:
    missing = tmp_path / "no-such-secret"
    error = config_error({name: str(missing)})
    assert str(error).startswith(OPTIONS_BY_NAME[name].flag)
    assert str(missing) in str(error)
    assert "No such file" in str(error)

    key = OPTIONS_BY_NAME[name].key
    write(user_config, f'{key} = "no-such-secret"\n')
    error = config_error()
    assert f"config file {user_config} ({key})" in str(error)
    assert str(user_config.parent / "no-such-secret") in str(error)


def test_repr_and_str_of_settings_never_show_a_secret(tmp_path: Path) -> None:
    secret_file = write(tmp_path / "client.secret", CLIENT_SECRET)
    settings = load_settings(
        {"client_secret": str(secret_file), "client_id": "cid"},
        {"CLOSEPROXY_PROXY_KEY": PROXY_KEY},
    )
    assert settings.require_client()[1].reveal() == CLIENT_SECRET
    assert settings.proxy_key is not None
    assert settings.proxy_key.reveal() == PROXY_KEY
    shown = [
        repr(settings),
        str(settings),
        f"{settings}",
        repr(settings.client_secret),
        str(settings.proxy_key),
        f"{settings.proxy_key}",
        repr(settings.require_client()),
        repr(dict(settings.sources)),
    ]
    for text in shown:
        assert CLIENT_SECRET not in text
        assert PROXY_KEY not in text
    assert "[secure]" in repr(settings)
    assert "cid" in repr(settings)  # the client id is not a secret; it still shows


# --- check_serve and require_client ---------------------------------------------------


@pytest.mark.parametrize(
    "host", ["0.0.0.0", "::", "192.168.1.20", "example.com", "localhost.example.com"]
)
def test_a_non_loopback_host_without_a_proxy_key_is_refused(host: str) -> None:
    settings = load_settings({"host": host}, {})
    with pytest.raises(ConfigError) as info:
        settings.check_serve()
    error = info.value
    message = str(error)
    assert error.exit_code == 2
    assert error.setting == "host"
    assert repr(host) in message
    assert "from --host" in message  # where the dangerous value came from
    assert "proxy key" in message
    assert "--proxy-key-file" in message
    assert "CLOSEPROXY_PROXY_KEY" in message
    assert "127.0.0.1" in message  # the other way out


def test_the_host_refusal_names_the_environment_when_it_came_from_there() -> None:
    settings = load_settings({}, {"CLOSEPROXY_HOST": "0.0.0.0"})
    with pytest.raises(ConfigError, match="environment variable CLOSEPROXY_HOST"):
        settings.check_serve()


def test_a_non_loopback_host_with_a_proxy_key_is_allowed(tmp_path: Path) -> None:
    load_settings({"host": "0.0.0.0"}, {"CLOSEPROXY_PROXY_KEY": PROXY_KEY}).check_serve()
    key_file = write(tmp_path / "key", PROXY_KEY)
    load_settings({"host": "::", "proxy_key": str(key_file)}, {}).check_serve()


@pytest.mark.parametrize(
    "host", ["127.0.0.1", "::1", "[::1]", "localhost", "LocalHost", "127.0.0.2"]
)
def test_loopback_hosts_need_no_proxy_key(host: str) -> None:
    load_settings({"host": host}, {}).check_serve()


def test_require_client_says_how_to_set_the_client_id(user_config: Path) -> None:
    settings = load_settings({}, {"CLOSEPROXY_CLIENT_SECRET": CLIENT_SECRET})
    with pytest.raises(ConfigError) as info:
        settings.require_client()
    message = str(info.value)
    assert info.value.exit_code == 2
    assert "client id is not set" in message
    for hint in ("--client-id", "CLOSEPROXY_CLIENT_ID", "client_id", str(user_config)):
        assert hint in message


def test_require_client_says_how_to_set_the_client_secret(
    tmp_path: Path, user_config: Path
) -> None:
    settings = load_settings({"client_id": "cid"}, {})
    with pytest.raises(ConfigError) as info:
        settings.require_client()
    message = str(info.value)
    assert "client secret is not set" in message
    for hint in ("--client-secret-file", "CLOSEPROXY_CLIENT_SECRET", "client_secret_file"):
        assert hint in message
    assert str(user_config) in message

    other = write(tmp_path / "other.toml", 'client_id = "cid"\n')
    with pytest.raises(ConfigError, match=r"other\.toml"):
        load_settings({}, {}, config_file=str(other)).require_client()


def test_require_client_returns_both_when_set() -> None:
    settings = load_settings({"client_id": "cid"}, {"CLOSEPROXY_CLIENT_SECRET": CLIENT_SECRET})
    client_id, secret = settings.require_client()
    assert (client_id, secret.reveal()) == ("cid", CLIENT_SECRET)
