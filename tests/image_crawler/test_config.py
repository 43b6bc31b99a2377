"""Settings come from the environment, once, and a bad value is refused by name."""

from __future__ import annotations

import pytest
from PIL import Image, features

from image_crawler.config import ConfigError, Settings, get_settings, load_settings


def test_an_empty_environment_gives_the_documented_defaults():
    settings = load_settings({})

    assert settings == Settings()
    assert settings.redis_url == "redis://localhost:6379/0"
    assert settings.mongo_uri == "mongodb://localhost:27017/image_crawler"
    assert settings.mongo_database == "image_crawler"
    assert settings.fetch_timeout == 30.0
    assert settings.fetch_retries == 3
    assert settings.fetch_max_bytes == 50 * 1024 * 1024
    assert settings.fetch_max_redirects == 5
    assert settings.fetch_allow_private is False
    assert settings.max_image_pixels == 50_000_000
    assert settings.png_compress_level == 1
    assert settings.claim_ttl == 3600
    assert settings.image_formats == "JPEG,PNG,GIF,WEBP,BMP,ICO,TIFF,MPO,AVIF"


@pytest.mark.parametrize(
    ("variable", "raw", "field", "expected"),
    [
        ("REDIS_URL", "redis://cache.internal:6380/2", "redis_url", "redis://cache.internal:6380/2"),
        ("REDIS_URL", "rediss://secure:6380/0", "redis_url", "rediss://secure:6380/0"),
        ("REDIS_URL", "unix:///run/redis.sock", "redis_url", "unix:///run/redis.sock"),
        ("MONGO_URI", "mongodb://db.internal:27018/crawl", "mongo_uri", "mongodb://db.internal:27018/crawl"),
        (
            "MONGO_URI",
            "mongodb+srv://cluster.example.com/crawl",
            "mongo_uri",
            "mongodb+srv://cluster.example.com/crawl",
        ),
        ("FETCH_TIMEOUT", "2.5", "fetch_timeout", 2.5),
        ("FETCH_TIMEOUT", "7", "fetch_timeout", 7.0),
        ("FETCH_RETRIES", "0", "fetch_retries", 0),
        ("FETCH_RETRIES", "12", "fetch_retries", 12),
        ("FETCH_MAX_BYTES", "1048576", "fetch_max_bytes", 1_048_576),
        ("FETCH_MAX_REDIRECTS", "0", "fetch_max_redirects", 0),
        ("FETCH_ALLOW_PRIVATE", "1", "fetch_allow_private", True),
        ("FETCH_ALLOW_PRIVATE", "true", "fetch_allow_private", True),
        ("FETCH_ALLOW_PRIVATE", "0", "fetch_allow_private", False),
        ("FETCH_ALLOW_PRIVATE", "no", "fetch_allow_private", False),
        ("MAX_IMAGE_PIXELS", "1000", "max_image_pixels", 1000),
        ("PNG_COMPRESS_LEVEL", "0", "png_compress_level", 0),
        ("PNG_COMPRESS_LEVEL", "9", "png_compress_level", 9),
        ("CLAIM_TTL", "600", "claim_ttl", 600),
        ("IMAGE_FORMATS", "png,jpeg", "image_formats", "PNG,JPEG"),
        ("IMAGE_FORMATS", "all", "image_formats", "all"),
    ],
)
def test_each_variable_sets_its_field(variable, raw, field, expected):
    settings = load_settings({variable: raw})

    assert getattr(settings, field) == expected
    untouched = {name: value for name, value in vars(Settings()).items() if name != field}
    assert {name: getattr(settings, name) for name in untouched} == untouched


def test_surrounding_whitespace_is_ignored_and_blank_means_default():
    settings = load_settings({"FETCH_RETRIES": " 7 \n", "FETCH_TIMEOUT": "   ", "MAX_IMAGE_PIXELS": ""})

    assert settings.fetch_retries == 7
    assert settings.fetch_timeout == Settings().fetch_timeout
    assert settings.max_image_pixels == Settings().max_image_pixels


def test_variables_are_read_by_their_upper_case_names_only():
    assert (
        load_settings({"fetch_retries": "9", "FetchRetries": "9"}).fetch_retries == Settings().fetch_retries
    )


@pytest.mark.parametrize(
    ("variable", "raw"),
    [
        ("FETCH_TIMEOUT", "abc"),
        ("FETCH_TIMEOUT", "0"),
        ("FETCH_TIMEOUT", "-1"),
        ("FETCH_TIMEOUT", "nan"),
        ("FETCH_RETRIES", "-1"),
        ("FETCH_RETRIES", "2.5"),
        ("FETCH_RETRIES", "101"),
        ("FETCH_MAX_BYTES", "0"),
        ("FETCH_MAX_REDIRECTS", "many"),
        ("FETCH_ALLOW_PRIVATE", "maybe"),
        ("FETCH_ALLOW_PRIVATE", "2"),
        ("MAX_IMAGE_PIXELS", "-5"),
        ("PNG_COMPRESS_LEVEL", "10"),
        ("PNG_COMPRESS_LEVEL", "-1"),
        ("CLAIM_TTL", "59"),
        ("MONGO_URI", "http://x"),
        ("MONGO_URI", "localhost:27017"),
        ("REDIS_URL", "http://localhost:6379"),
        ("IMAGE_FORMATS", "JPEG,HEIC"),
        ("IMAGE_FORMATS", "PDF"),
        ("IMAGE_FORMATS", ","),
        ("IMAGE_FORMATS", "all,SGI"),
    ],
)
def test_an_invalid_value_is_refused_naming_the_variable_and_the_value(variable, raw):
    with pytest.raises(ConfigError) as caught:
        load_settings({variable: raw})

    message = str(caught.value)
    assert message.startswith(f"{variable}={raw!r} is invalid: ")
    assert "must be" in message


@pytest.mark.parametrize("raw", ["inf", "1e308", "3601"])
def test_a_fetch_timeout_the_workers_cannot_turn_into_a_time_limit_is_refused(raw):
    # actors.py turns FETCH_TIMEOUT into an integer time limit: inf used to crash every worker at import.
    with pytest.raises(ConfigError, match=f"FETCH_TIMEOUT={raw!r}"):
        load_settings({"FETCH_TIMEOUT": raw})


def test_the_longest_fetch_timeout_is_an_hour():
    assert load_settings({"FETCH_TIMEOUT": "3600"}).fetch_timeout == 3600.0


# --- IMAGE_FORMATS ----------------------------------------------------------------------

WEB_FORMATS = {"JPEG", "PNG", "GIF", "WEBP", "BMP", "ICO", "TIFF", "MPO", "AVIF"}


def test_the_default_formats_are_the_webs_raster_formats():
    expected = WEB_FORMATS if features.check("avif") else WEB_FORMATS - {"AVIF"}
    assert Settings().allowed_image_formats == expected


def test_the_documented_default_reads_back_as_the_default():
    # docker-compose.yml passes the default as written; it must parse to the very same settings.
    assert load_settings({"IMAGE_FORMATS": "JPEG,PNG,GIF,WEBP,BMP,ICO,TIFF,MPO,AVIF"}) == Settings()


def test_format_names_are_case_insensitive_and_whitespace_is_tolerated():
    settings = load_settings({"IMAGE_FORMATS": " jpeg , Png,\tgif ,, sgi "})
    assert settings.image_formats == "JPEG,PNG,GIF,SGI"
    assert settings.allowed_image_formats == {"JPEG", "PNG", "GIF", "SGI"}


def test_a_format_named_twice_counts_once():
    assert load_settings({"IMAGE_FORMATS": "PNG,png,JPEG"}).image_formats == "PNG,JPEG"


@pytest.mark.parametrize("raw", ["all", "ALL", " All "])
def test_all_is_every_format_pillow_decodes_but_eps(raw):
    Image.init()
    allowed = load_settings({"IMAGE_FORMATS": raw}).allowed_image_formats
    assert allowed == (set(Image.OPEN) | {"MPO"}) - {"EPS"}
    assert {"SGI", "PSD", "DDS", "FLI", "PCX", "TGA"} <= allowed


@pytest.mark.parametrize("raw", ["EPS", "eps", "PNG,EPS"])
def test_eps_is_refused_even_when_named(raw):
    with pytest.raises(ConfigError) as caught:
        load_settings({"IMAGE_FORMATS": raw})
    message = str(caught.value)
    assert message.startswith(f"IMAGE_FORMATS={raw!r} is invalid: ")
    assert "EPS is always refused" in message


def test_an_unknown_format_is_refused_listing_the_known_ones():
    with pytest.raises(ConfigError) as caught:
        load_settings({"IMAGE_FORMATS": "JPEG,HEIC"})
    message = str(caught.value)
    assert "'HEIC'" in message
    for known in ("JPEG", "PNG", "SGI", "TIFF", "MPO", "all"):
        assert known in message
    assert "EPS" not in message


def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)


@pytest.mark.parametrize(
    ("uri", "database"),
    [
        ("mongodb://localhost:27017/crawl", "crawl"),
        ("mongodb://user:secret@db1:27017,db2:27017/crawl?replicaSet=rs0&authSource=admin", "crawl"),
        ("mongodb+srv://cluster.example.com/crawl?retryWrites=true", "crawl"),
        ("mongodb://localhost:27017/", "image_crawler"),
        ("mongodb://localhost:27017", "image_crawler"),
        ("mongodb://localhost:27017/?replicaSet=rs0", "image_crawler"),
        ("mongodb://localhost:27017?replicaSet=rs0", "image_crawler"),
    ],
)
def test_the_database_is_the_path_of_the_mongo_uri(uri, database):
    assert load_settings({"MONGO_URI": uri}).mongo_database == database


def test_settings_are_frozen():
    with pytest.raises(AttributeError):
        Settings().fetch_retries = 9  # type: ignore[misc]


def test_get_settings_reads_the_environment_once(monkeypatch):
    get_settings.cache_clear()
    try:
        monkeypatch.setenv("FETCH_MAX_REDIRECTS", "7")
        first = get_settings()
        monkeypatch.setenv("FETCH_MAX_REDIRECTS", "9")

        assert first.fetch_max_redirects == 7
        assert get_settings() is first
        get_settings.cache_clear()
        assert get_settings().fetch_max_redirects == 9
    finally:
        monkeypatch.undo()
        get_settings.cache_clear()


def test_get_settings_raises_config_error_for_a_bad_environment(monkeypatch):
    get_settings.cache_clear()
    try:
        monkeypatch.setenv("FETCH_RETRIES", "x")
        with pytest.raises(ConfigError, match="FETCH_RETRIES='x'"):
            get_settings()
    finally:
        monkeypatch.undo()
        get_settings.cache_clear()


def test_web_credentials_are_set_together_and_the_user_name_holds_no_colon():
    with pytest.raises(ConfigError, match="set together"):
        load_settings({"WEB_USER": "admin"})
    with pytest.raises(ConfigError, match="colon"):
        load_settings({"WEB_USER": "ad:min", "WEB_PASSWORD": "secret"})


def test_the_web_password_is_taken_as_written():
    assert load_settings({"WEB_USER": "admin", "WEB_PASSWORD": " two words "}).web_password == " two words "


def test_a_refused_url_setting_shows_no_password_however_it_is_written():
    with pytest.raises(ConfigError) as refused:
        load_settings({"MONGO_URI": "http://admin:pa/ss@mongo:27017/db"})

    assert "pa/ss" not in str(refused.value) and "admin" not in str(refused.value)


def test_every_setting_says_what_it_means_and_is_read_by_its_own_parser():
    import dataclasses

    from image_crawler.config import Settings, describe, load_settings

    for setting in dataclasses.fields(Settings):
        assert describe(setting.name).strip(), setting.name
        parse = setting.metadata["parse"]
        default = setting.default
        shown = ("1" if default else "0") if isinstance(default, bool) else str(default)
        if shown:  # the default, written as a variable, reads back as the default
            assert parse(shown) == default, setting.name
            assert getattr(load_settings({setting.name.upper(): shown}), setting.name) == default


def test_the_database_is_the_uri_path():
    from image_crawler.config import database_name

    assert database_name("mongodb://mongo:27017/crawl?replicaSet=rs0") == "crawl"
    assert database_name("mongodb://mongo:27017") == "image_crawler"
    assert database_name("mongodb+srv://user:pw@cluster.example.net/other") == "other"


# --- bounds and messages, parser by parser (what make mutate found untested) --------------
#
# Settings' parsers are made once, when the module is imported; these build them again, so
# that the bounds a variable is held to are checked where they are decided.


@pytest.mark.parametrize("raw", ["1", "0.5", "0.001"])
def test_a_fetch_timeout_under_a_second_is_allowed(raw):
    assert load_settings({"FETCH_TIMEOUT": raw}).fetch_timeout == float(raw)


def test_a_refused_fetch_timeout_says_what_is_expected():
    with pytest.raises(ConfigError) as caught:
        load_settings({"FETCH_TIMEOUT": "0"})
    assert str(caught.value) == "FETCH_TIMEOUT='0' is invalid: must be a number of seconds in (0, 3600]"


def test_an_integer_setting_holds_its_bounds_and_says_them():
    from image_crawler.config import _int_in

    parse = _int_in(3, 10)
    assert (parse("3"), parse("10"), parse(" 7 ")) == (3, 10, 7)
    for refused in ("2", "11", "x", "4.0"):
        with pytest.raises(ValueError) as caught:
            parse(refused)
        assert str(caught.value) == "must be an integer in [3, 10]"

    unbounded = _int_in(16)
    assert unbounded("16") == 16 and unbounded(str(10**12)) == 10**12
    with pytest.raises(ValueError) as caught:
        unbounded("15")
    assert str(caught.value) == "must be an integer in [16, ∞]"


def test_a_url_setting_takes_its_schemes_only_and_names_them():
    from image_crawler.config import _url

    parse = _url("redis", "rediss")
    assert parse("rediss://cache:6380/0") == "rediss://cache:6380/0"
    with pytest.raises(ValueError) as caught:
        parse("http://cache:6380/0")
    assert str(caught.value) == "must be a URL starting with redis:// or rediss://"


@pytest.mark.parametrize(
    ("raw", "value"),
    [
        ("1", True),
        ("true", True),
        ("YES", True),
        ("On", True),
        ("0", False),
        ("False", False),
        ("no", False),
        ("OFF", False),
        ("", False),
    ],
)
def test_a_flag_reads_the_usual_spellings(raw, value):
    import dataclasses

    parse = {item.name: item for item in dataclasses.fields(Settings)}["obey_robots"].metadata["parse"]
    assert parse(raw) is value


def test_a_flag_that_is_neither_says_so():
    with pytest.raises(ConfigError) as caught:
        load_settings({"OBEY_ROBOTS": "maybe"})
    assert str(caught.value) == "OBEY_ROBOTS='maybe' is invalid: must be 0 or 1"


def test_a_setting_field_keeps_its_default_parser_and_meaning():
    from image_crawler.config import _setting

    made = _setting(5, int, "five of them", repr=False)
    assert (made.default, dict(made.metadata), made.repr) == (5, {"parse": int, "doc": "five of them"}, False)


def test_a_url_setting_is_stripped_of_surrounding_whitespace():
    assert load_settings({"REDIS_URL": "  redis://cache:6379/1 \n"}).redis_url == "redis://cache:6379/1"


def test_a_database_name_keeps_its_own_letters():
    from image_crawler.config import database_name

    assert database_name("mongodb://mongo:27017/XX_crawl") == "XX_crawl"


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ("all,SGI", "must be all, alone, or a comma list of Pillow format names"),
        (",", "must be a comma list of Pillow format names, or all; it names none"),
    ],
)
def test_a_refused_format_list_says_what_is_expected(raw, message):
    with pytest.raises(ConfigError) as caught:
        load_settings({"IMAGE_FORMATS": raw})
    assert str(caught.value) == f"IMAGE_FORMATS={raw!r} is invalid: {message}"


def test_the_known_formats_are_listed_in_order_comma_separated():
    with pytest.raises(ConfigError) as caught:
        load_settings({"IMAGE_FORMATS": "HEIC"})
    listed = str(caught.value).split("is none of ", 1)[1].split(", ")
    assert listed == sorted(listed)
    assert {"JPEG", "PNG", "SGI"} <= set(listed)


@pytest.mark.parametrize(
    ("name", "decodable"),
    [
        ("PNG", True),
        ("SGI", True),
        ("JPEG", features.check("jpg")),
        ("WEBP", features.check("webp")),
        ("AVIF", features.check("avif")),
        ("NOPE", False),
    ],
)
def test_a_format_is_decodable_when_pillow_has_its_plugin_and_codec(name, decodable):
    from image_crawler.config import _decodable

    assert _decodable(name) is bool(decodable)


def test_the_web_credentials_errors_name_both_variables():
    with pytest.raises(ConfigError) as caught:
        load_settings({"WEB_PASSWORD": "secret"})
    assert str(caught.value) == "WEB_USER and WEB_PASSWORD must be set together (or neither)"
    with pytest.raises(ConfigError) as caught:
        load_settings({"WEB_USER": "a:b", "WEB_PASSWORD": "secret"})
    assert str(caught.value) == "WEB_USER cannot hold a colon: basic auth ends the user name there"


def test_a_format_whose_codec_this_pillow_lacks_is_not_decodable(monkeypatch):
    from image_crawler import config

    monkeypatch.setattr(config.features, "check", lambda feature: False)
    assert config._decodable("WEBP") is False
    assert config._decodable("JPEG") is False
    assert config._decodable("PNG") is True  # no codec of its own to lack
